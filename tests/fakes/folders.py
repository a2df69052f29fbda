"""Local diffusers folders for the build tests: a tiny SD pipeline whose VAE downsamples 2x (diffusers' test shape)."""

from __future__ import annotations

from pathlib import Path

TEXT_CONFIG = {"bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 32,
               "intermediate_size": 37, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
               "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": 32,
               "vocab_size": 49408}
UNET_SAMPLE_SIZE = 16
VAE_BLOCKS = (32, 64)  # two VAE blocks: the latents are 1/2 of the picture


def save_tiny_2x_folder(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline saved with safetensors: UNet sample_size 16, a 2x VAE, a 2-layer CLIP encoder."""
    import diffusers
    import torch
    import transformers

    from sdexport.export.tokenizer_files import write_clip_tokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE, block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        block_out_channels=list(VAE_BLOCKS), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG))
    tok_dir = write_clip_tokenizer(folder.parent / f".{folder.name}-tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
