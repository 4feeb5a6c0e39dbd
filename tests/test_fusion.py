"""Gated fusion: gate in (0, 1) per channel, reliabilities, clean removal of a missing modality."""

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.models import fusion


def make_inputs(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32),
    jnp.asarray(rng.normal(size=(batch, 6)), jnp.float32),
    jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32),
  )


def test_fused_is_the_gated_reliability_weighted_sum():
  video, audio, text = make_inputs()
  present = jnp.ones((4,), bool)
  layer = fusion.GatedFusion(features=16)
  variables = layer.init(jax.random.key(0), video, audio, text, present, present)
  fused, gate, r_v, r_a = layer.apply(variables, video, audio, text, present, present)
  assert fused.shape == gate.shape == (4, 16) and r_v.shape == r_a.shape == (4,)
  assert np.all((gate > 0) & (gate < 1)) and np.all((r_v > 0) & (r_v < 1)) and np.all((r_a > 0) & (r_a < 1))
  params = variables["params"]
  video_hidden = jnp.tanh(video @ params["video_in"]["kernel"] + params["video_in"]["bias"])
  audio_hidden = jnp.tanh(audio @ params["audio_in"]["kernel"] + params["audio_in"]["bias"])
  expected = r_v[:, None] * gate * video_hidden + r_a[:, None] * (1 - gate) * audio_hidden
  np.testing.assert_allclose(fused, expected, atol=1e-6)
  # The gate is conditioned on the text too.
  _, gate_other_text, _, _ = layer.apply(variables, video, audio, -text, present, present)
  assert not np.allclose(gate, gate_other_text)


def test_missing_modality_is_removed_cleanly():
  video, audio, text = make_inputs()
  layer = fusion.GatedFusion(features=16)
  no_video = jnp.asarray([True, False, True, False])
  present = jnp.ones((4,), bool)
  variables = layer.init(jax.random.key(0), video, audio, text, present, present)
  fused, gate, r_v, r_a = layer.apply(variables, video, audio, text, no_video, present)
  np.testing.assert_array_equal(r_v[1], 0.0)
  np.testing.assert_array_equal(r_v[3], 0.0)
  # Rows without video do not depend on the video features at all.
  fused_other, _, _, _ = layer.apply(variables, video * 100 + 3, audio, text, no_video, present)
  np.testing.assert_allclose(fused[1], fused_other[1], atol=1e-6)
  assert not np.allclose(fused[0], fused_other[0])
  # Both missing: nothing left.
  absent = jnp.zeros((4,), bool)
  fused_none, _, _, _ = layer.apply(variables, video, audio, text, absent, absent)
  np.testing.assert_array_equal(fused_none, 0.0)


def test_ablations_fix_gate_and_reliability():
  video, audio, text = make_inputs()
  present = jnp.ones((4,), bool)
  layer = fusion.GatedFusion(features=16, use_gate=False, use_reliability=False)
  variables = layer.init(jax.random.key(0), video, audio, text, present, present)
  _, gate, r_v, r_a = layer.apply(variables, video, audio, text, present, present)
  np.testing.assert_array_equal(gate, 0.5)
  np.testing.assert_array_equal(r_v, 1.0)
  np.testing.assert_array_equal(r_a, 1.0)
  assert "gate" not in variables["params"] and "reliability_video" not in variables["params"]
