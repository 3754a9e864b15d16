"""Run by test_vision_multiprocess.py: the SimCLR loss and gradients of one batch, on one process (the
whole batch) or under `accelerate launch` with several (each its share), saved to OUT.pt."""

import sys

import torch
from accelerate import Accelerator

from lmssl.data.views import ViewOptions, apply_views, draw_views
from lmssl.models import ModelConfig
from lmssl.objectives.simclr import Options, SimCLR, nt_xent
from lmssl.objectives.vision import image_processor

IMAGES, SIZE = 8, 16


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    objective = SimCLR(Options(projection_hidden=32, projection_dim=16, temperature=0.3),
                       image_processor(SIZE, [0.5] * 3, [0.25] * 3))
    torch.manual_seed(0)
    model = objective.build_model(ModelConfig(family="vit", size="tiny", image_size=SIZE, patch_size=4))
    module = objective.training_module(model).double()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (IMAGES, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    views = draw_views(2 * IMAGES, SIZE, SIZE, ViewOptions(), g)
    pixels = apply_views(images.repeat(2, 1, 1, 1), views, SIZE, objective.mean, objective.std).double()
    first, second = pixels[:IMAGES], pixels[IMAGES:]
    share = IMAGES // world
    mine = slice(rank * share, (rank + 1) * share)      # this process's images, both views of each
    module = accelerator.prepare(module)
    loss = nt_xent(module(torch.cat([first[mine], second[mine]])), objective.options.temperature)
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), "mean")
    grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(module).named_parameters()}
    if accelerator.is_main_process:
        torch.save({"loss": mean_loss, "grads": grads, "world": world}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the process group: gloo threads must not outlive it at exit


if __name__ == "__main__":
    main(sys.argv[1])
