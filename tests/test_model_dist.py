"""Gathered ITC across 2 gloo processes equals the single-process loss on the same global batch, gradients too."""
from __future__ import annotations

import faulthandler
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.losses import itc_loss

WORLD = 2


# Text ids of the global batch: rows 0, 2 and 4 share a text, so do 1 and 3, across the two ranks' slices.
TEXT_IDS = torch.tensor([[101, 7], [101, 8], [101, 7], [101, 8], [101, 7], [101, 9]])


def _global_batch(rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear, torch.nn.Linear]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(sum(rows), 5, generator=g)
    texts = torch.randn(sum(rows), 7, generator=g)
    torch.manual_seed(1)
    return images, texts, torch.nn.Linear(5, 4), torch.nn.Linear(7, 4)


def _loss(images, texts, image_proj, text_proj, ids: torch.Tensor | None) -> torch.Tensor:
    return itc_loss(F.normalize(image_proj(images), dim=-1), F.normalize(text_proj(texts), dim=-1),
                    torch.tensor(0.1), ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, rows: tuple[int, int], same_text: bool) -> None:
    faulthandler.dump_traceback_later(240, exit=True)   # a hung collective fails the test instead of the suite
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, texts, image_proj, text_proj = _global_batch(rows)
        local = slice(sum(rows[:rank]), sum(rows[:rank + 1]))
        ids = TEXT_IDS[local] if same_text else None
        loss = _loss(images[local], texts[local], image_proj, text_proj, ids)
        loss.backward()
        grads = [p.grad.clone() for p in (*image_proj.parameters(), *text_proj.parameters())]
        for grad in grads:             # what DDP does: average parameter gradients over ranks
            dist.all_reduce(grad)
            grad /= WORLD
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("rows,same_text", [((3, 3), False), ((3, 2), False), ((3, 3), True), ((3, 2), True)])
def test_gathered_itc_equals_single_process_loss_and_gradients(tmp_path, rows, same_text):
    """Also with identical texts left out (itc_same_text: ignore), whose pairs span the two ranks."""
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), rows, same_text), nprocs=WORLD, join=True)
    images, texts, image_proj, text_proj = _global_batch(rows)
    loss = _loss(images, texts, image_proj, text_proj, TEXT_IDS[:sum(rows)] if same_text else None)
    loss.backward()
    expected = [p.grad for p in (*image_proj.parameters(), *text_proj.parameters())]
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(result["loss"], loss, atol=1e-6), (rank, result["loss"], loss)
        for got, want in zip(result["grads"], expected):
            assert torch.allclose(got, want, atol=1e-6), (rank, got, want)
