"""The synthetic MaX-DeepLab demo config (configs/synthetic/max_deeplab_s_os16_synthetic_demo.
textproto) is MaX-DeepLab-S on the kMaX demo's budget."""

from tests.config.test_configs import load


def test_max_synthetic_demo_has_the_kmax_demos_budget():
  config = load('synthetic/max_deeplab_s_os16_synthetic_demo.textproto')
  kmax = load('synthetic/kmax_r50_os32_synthetic_demo.textproto')
  assert config.model_options.WhichOneof('meta_architecture') == 'max_deeplab'
  backbone = config.model_options.backbone
  assert (backbone.name, backbone.output_stride) == ('max_deeplab_s', 16)
  # Same data, crop, batch, steps, optimizer and losses as the kMaX demo; as many slots as
  # kMaX has cluster centers.
  for name in ('train_dataset_options', 'eval_dataset_options', 'trainer_options'):
    assert getattr(config, name) == getattr(kmax, name), name
  max_options = config.model_options.max_deeplab
  assert max_options.num_mask_slots == kmax.model_options.kmax.num_cluster_centers
  # MaX-DeepLab's instance discrimination and pixel-wise post-processing (DeepLab2's MaX
  # configs); kMaX's demo is mask-wise.
  assert max_options.instance_discrimination_sample_k == 0
  assert config.evaluator_options.transformer_post_processing == 'pixelwise'
  # The widths the backbone multipliers leave alone are set below MaX-DeepLab-S's.
  dual_path = max_options.dual_path
  for name, full_size in (('memory_channels', 256), ('base_transformer_expansion', 1.0),
                          ('transformer_ffn_channels', 2048),
                          ('global_feed_forward_network_channels', 256)):
    assert dual_path.HasField(name) and getattr(dual_path, name) < full_size, name
