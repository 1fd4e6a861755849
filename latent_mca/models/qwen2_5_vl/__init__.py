"""Qwen2.5-VL in Flax Linen: model, configs, positions and Hugging Face checkpoint I/O.

    from latent_mca.models import qwen2_5_vl
    model, params = qwen2_5_vl.from_pretrained(path, dtype=jnp.float32)
    out = model.apply({"params": params}, input_ids, attention_mask=mask,
                      pixel_values=pv, image_grid_thw=thw)      # out.logits [B, T, V]
    qwen2_5_vl.save_pretrained(model, params, path)
"""

from latent_mca.models.qwen2_5_vl.checkpoint import (CheckpointError, from_pretrained,
                                                     load_params, read_config, save_pretrained,
                                                     to_hf_state)
from latent_mca.models.qwen2_5_vl.config import (ConfigError, Qwen2_5_VLConfig, TextConfig,
                                                 VisionConfig)
from latent_mca.models.qwen2_5_vl.model import (ModelOutput, Qwen2_5_VL, abstract_params,
                                                check_image_inputs, init_params)
from latent_mca.models.qwen2_5_vl.positions import (VisionLayout, mrope_positions,
                                                    text_positions, vision_layout)
