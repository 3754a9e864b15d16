"""Run by test_momentum_methods.py: MoCo v3's loss and gradients on one batch, on one process (the
whole batch) or under `accelerate launch` with several (each its share), saved to OUT.pt; each
process also saves its own queries and keys to OUT.<rank>.pt, to recompute the loss without
other processes' keys."""

import sys

import torch
from accelerate import Accelerator

from lmssl.data.views import ViewOptions, apply_views, draw_views
from lmssl.models import ModelConfig
from lmssl.objectives.moco_v3 import MoCoV3, Options, moco_v3_loss
from lmssl.objectives.vision import image_processor

IMAGES, SIZE = 8, 16


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    objective = MoCoV3(Options(projection_hidden=32, projection_dim=16, predictor_hidden=32, temperature=0.3),
                       image_processor(SIZE, [0.5] * 3, [0.25] * 3))
    torch.manual_seed(0)
    model = objective.build_model(ModelConfig(family="vit", size="tiny", image_size=SIZE, patch_size=4))
    module = objective.training_module(model).double()
    with torch.no_grad():                       # a momentum encoder that is not the online one
        for p in module.target.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    module.eval()   # batch norm on running statistics: every row depends on its own image only, on any split
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (IMAGES, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    views = draw_views(2 * IMAGES, SIZE, SIZE, ViewOptions(), g)
    pixels = apply_views(images.repeat(2, 1, 1, 1), views, SIZE, objective.mean, objective.std).double()
    first, second = pixels[:IMAGES], pixels[IMAGES:]
    share = IMAGES // world
    mine = slice(rank * share, (rank + 1) * share)      # this process's images, both views of each
    module = accelerator.prepare(module)
    _, q, k = module(torch.cat([first[mine], second[mine]]))
    loss = moco_v3_loss(q, k, objective.options.temperature)
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), "mean")
    unwrapped = accelerator.unwrap_model(module)
    grads = {n: p.grad.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
    target_grads = [p.grad for p in unwrapped.target.parameters()]
    torch.save({"q": q.detach(), "k": k.detach()}, f"{out}.{rank}.pt")
    if accelerator.is_main_process:
        torch.save({"loss": mean_loss, "grads": grads, "world": world,
                    "target_grads_none": all(g is None for g in target_grads)}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the process group: gloo threads must not outlive it at exit


if __name__ == "__main__":
    main(sys.argv[1])
