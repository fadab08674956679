"""The model core that `export/` compiles: open_clip backbone access, the explicit ViT forward
(capture / splice), the cross-layer transcoder and its sparse kernels, the additive decomposition,
and CLT checkpoints. Trainers, data and evaluation live one level up in `training/`."""
