"""Image classification on a ViT backbone, for the probe stage: the frozen CLS features a linear
probe reads (the probe itself is evaluation.linear_probe), and full fine-tuning of
`ViTForImageClassification` through the training loop, on augmented views.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmssl.data.views import ViewOptions, apply_views, draw_views, to_pixels
from lmssl.objectives.vision import batch_generator, flatten_views, stack_images, views_of


class BackboneFeatures:
    """The CLS token of a ViTModel on a batch's images as they are: the features a probe sees."""

    def __init__(self, mean, std):
        self.mean, self.std = list(mean), list(std)

    def collate(self, examples):
        return {"images": stack_images(examples)}

    @torch.no_grad()
    def features(self, module, batch) -> torch.Tensor:
        return module(pixel_values=to_pixels(batch["images"], self.mean, self.std)).last_hidden_state[:, 0]


class ImageClassification:
    """Fine-tuning a ViTForImageClassification: training batches are augmented views (random resized
    crop and flip by default), evaluation sees the images as they are."""

    name = "image_classification"
    stat_names = ("loss", "accuracy")

    def __init__(self, size: int, mean, std, views: Optional[ViewOptions] = None):
        self.size, self.mean, self.std = size, list(mean), list(std)
        self.views = views or ViewOptions(jitter=0.0, grayscale=0.0, blur=0.0)

    def training_module(self, model):
        return model

    def collate(self, examples):
        images = stack_images(examples)
        views = draw_views(len(examples), self.size, self.size, self.views, batch_generator())
        return {"images": images, "labels": torch.tensor([int(e["label"]) for e in examples]),
                **flatten_views(views, "views")}

    def pixels(self, module, batch) -> torch.Tensor:
        if module.training:
            return apply_views(batch["images"], views_of(batch, "views"), self.size, self.mean, self.std)
        return to_pixels(batch["images"], self.mean, self.std)

    def loss(self, module, batch):
        logits = module(pixel_values=self.pixels(module, batch)).logits
        loss = F.cross_entropy(logits.float(), batch["labels"])
        n = float(batch["labels"].shape[0])
        return loss, {"loss": (loss.detach() * n, n), "accuracy": ((logits.argmax(1) == batch["labels"]).sum(), n)}

    @torch.no_grad()
    def predict(self, module, batch) -> torch.Tensor:
        return module(pixel_values=self.pixels(module, batch)).logits.argmax(1)
