"""DSKD: dual-space knowledge distillation, with cross-model attention when the vocabularies differ."""
