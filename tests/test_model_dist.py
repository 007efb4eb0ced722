"""ITC across 2 gloo processes: the loss equals the single-process loss on the global batch; gradients in X-VLM's
convention (each rank's own loss, itc_gather_grad "local") or summed over ranks ("sum")."""
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


def _loss(images, texts, image_proj, text_proj, ids: torch.Tensor | None, grad: str = "local") -> torch.Tensor:
    return itc_loss(F.normalize(image_proj(images), dim=-1), F.normalize(text_proj(texts), dim=-1),
                    torch.tensor(0.1), ids, grad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, rows: tuple[int, int], same_text: bool, grad: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)   # a hung collective fails the test instead of the suite
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, texts, image_proj, text_proj = _global_batch(rows)
        local = slice(sum(rows[:rank]), sum(rows[:rank + 1]))
        ids = TEXT_IDS[local] if same_text else None
        images, texts = images[local].requires_grad_(), texts[local].requires_grad_()
        loss = _loss(images, texts, image_proj, text_proj, ids, grad)
        loss.backward()
        grads = [p.grad.clone() for p in (*image_proj.parameters(), *text_proj.parameters())]
        for param_grad in grads:       # what DDP does: average parameter gradients over ranks
            dist.all_reduce(param_grad)
            param_grad /= WORLD
        torch.save({"loss": loss.detach(), "grads": grads, "inputs": [images.grad, texts.grad]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(rows: tuple[int, int], same_text: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The loss every rank computes (over the global batch), its parameter gradients and its input gradients."""
    images, texts, image_proj, text_proj = _global_batch(rows)
    images, texts = images.requires_grad_(), texts.requires_grad_()
    loss = _loss(images, texts, image_proj, text_proj, TEXT_IDS[:sum(rows)] if same_text else None)
    loss.backward()
    return loss, [p.grad for p in (*image_proj.parameters(), *text_proj.parameters())], [images.grad, texts.grad]


@pytest.mark.dist
@pytest.mark.parametrize("rows,same_text", [((3, 3), False), ((3, 2), False), ((3, 3), True), ((3, 2), True)])
def test_gathered_itc_gradient_is_each_ranks_own_loss_as_xvlm(tmp_path, rows, same_text):
    """itc_gather_grad "local" (X-VLM's AllGather): rank r's features get the gradient of rank r's own loss, i.e.
    the single-process gradient of the global loss at r's rows, and nothing from the other ranks' losses; after
    DDP's average the parameters get 1/N of the single-process gradient. Also with uneven rows and with identical
    texts left out (itc_same_text: ignore), whose pairs span the two ranks."""
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), rows, same_text, "local"), nprocs=WORLD, join=True)
    loss, param_grads, input_grads = _single_process(rows, same_text)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(result["loss"], loss, atol=1e-6), (rank, result["loss"], loss)
        local = slice(sum(rows[:rank]), sum(rows[:rank + 1]))
        for got, want in zip(result["inputs"], input_grads):
            assert torch.allclose(got, want[local], atol=1e-6), (rank, got, want[local])
        for got, want in zip(result["grads"], param_grads):
            assert torch.allclose(got, want / WORLD, atol=1e-6), (rank, got, want / WORLD)


@pytest.mark.dist
@pytest.mark.parametrize("rows,same_text", [((3, 3), False), ((3, 2), True)])
def test_gathered_itc_with_summed_gradients_equals_single_process_gradients(tmp_path, rows, same_text):
    """itc_gather_grad "sum" (ours, open_clip's): every rank's gradient is summed into the local slice, so each
    rank's features get N times the gradient of its own loss and the DDP-averaged parameter gradients equal the
    single-process gradient on the global batch."""
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), rows, same_text, "sum"), nprocs=WORLD, join=True)
    loss, param_grads, input_grads = _single_process(rows, same_text)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(result["loss"], loss, atol=1e-6), (rank, result["loss"], loss)
        local = slice(sum(rows[:rank]), sum(rows[:rank + 1]))
        for got, want in zip(result["inputs"], input_grads):
            assert torch.allclose(got, WORLD * want[local], atol=1e-6), (rank, got, WORLD * want[local])
        for got, want in zip(result["grads"], param_grads):
            assert torch.allclose(got, want, atol=1e-6), (rank, got, want)
