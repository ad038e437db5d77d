"""Files shipped with the package: ImageNet class table, the digits SViT checkpoint and sample images,
DiffRate's per-block rates (its authors' json, DeiT entries)."""
