"""Sampling a trained model: CFG (`cfg`), the denoising loop (`loop`), the unmasking loop (`unmask`), the one
sampler/objective compatibility check (`fit`), per-index seeds (`seeds`), the conditions of sample indices
(`conditions`) and the image sampler that ties them (`image`)."""
