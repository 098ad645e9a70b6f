"""2-D position encodings for the transformer: sine (DETR's default) and learned row/column tables."""

import math

import flax.linen as nn
import jax.numpy as jnp


def sine_position_encoding(mask, num_pos_feats: int = 128, temperature: float = 10000.,
                                                      normalize: bool = True, scale: float = 2 * math.pi):
    """The official `PositionEmbeddingSine`: y features then x features, sin/cos interleaved.

    Args:
        mask: bool [B, h, w], True on real (unpadded) positions of the feature map.
        num_pos_feats: features per axis; the output has 2 * num_pos_feats channels (= hidden_dim).
    Returns:
        float32 [B, h, w, 2 * num_pos_feats].
    """
    not_mask = mask.astype(jnp.float32)
    y_embed = jnp.cumsum(not_mask, axis=1)
    x_embed = jnp.cumsum(not_mask, axis=2)
    if normalize:
        eps = 1e-6
        # Normalised by the extent of the real image, so padding does not change the encodings.
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    return jnp.concatenate([_sine_features(y_embed, num_pos_feats, temperature),
                            _sine_features(x_embed, num_pos_feats, temperature)], axis=-1)


def _sine_features(embed, num_pos_feats: int, temperature: float):
    """[...] scaled positions -> float32 [..., num_pos_feats]: sin on even, cos on odd features (the official
    `PositionEmbeddingSine`'s frequencies)."""
    dim_t = jnp.arange(num_pos_feats, dtype=jnp.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = embed[..., None] / dim_t
    return jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1).reshape(pos.shape)


class LearnedPositionEncoding(nn.Module):
    """The official `PositionEmbeddingLearned`: 50 x 50 row and column tables, x features then y."""
    num_pos_feats: int = 128
    max_size: int = 50

    @nn.compact
    def __call__(self, mask):  # bool [B, h, w] -> float32 [B, h, w, 2 * num_pos_feats]
        b, h, w = mask.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"learned position encoding covers at most {self.max_size}x{self.max_size} "
                             f"feature positions, got {h}x{w}; use position_embedding='sine' for larger images")
        init = nn.initializers.uniform(1.0)  # official: nn.init.uniform_ on [0, 1)
        row_embed = self.param("row_embed", init, (self.max_size, self.num_pos_feats))
        col_embed = self.param("col_embed", init, (self.max_size, self.num_pos_feats))
        x_emb = jnp.broadcast_to(col_embed[None, :w], (h, w, self.num_pos_feats))
        y_emb = jnp.broadcast_to(row_embed[:h, None], (h, w, self.num_pos_feats))
        pos = jnp.concatenate([x_emb, y_emb], axis=-1)
        return jnp.broadcast_to(pos[None], (b, h, w, 2 * self.num_pos_feats))


def box_sine_encoding(boxes, num_pos_feats: int = 64, temperature: float = 10000., scale: float = 2 * math.pi):
    """Sine encodings of boxes, as DAB-DETR's and DN-DETR's `gen_sineembed_for_position` (sin/cos interleaved).

    Args:
        boxes: [..., 4] cxcywh normalised (any 4 numbers in [0, 1]).
    Returns:
        float32 [..., 4 * num_pos_feats]: cx, cy, w, h features in that order.
    """
    pos = _sine_features(boxes.astype(jnp.float32) * scale, num_pos_feats, temperature)  # [..., 4, F]
    return pos.reshape(boxes.shape[:-1] + (4 * num_pos_feats,))
