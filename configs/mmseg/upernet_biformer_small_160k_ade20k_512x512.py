_base_ = ['_base_/models/upernet.py', 'mmseg::_base_/datasets/ade20k.py',
          '_base_/schedules/schedule_160k_adamw.py', 'mmseg::_base_/default_runtime.py']
from attnzoo.heads import feature_channels  # noqa: E402  (in_channels from the model's feature_info)

# ImageNet weights converted by tools/convert_checkpoint.py; train from scratch with
# --cfg-options model.backbone.checkpoint=None
# n_win: 16 regions per side for detection, 8 for segmentation (official downstream configs)
model = dict(
    backbone=dict(model_name='biformer_small', drop_path_rate=0.3, n_win=8,
                  checkpoint='checkpoints/biformer_small.safetensors'),
    decode_head=dict(in_channels=feature_channels('biformer_small'), num_classes=150),
    auxiliary_head=dict(in_channels=feature_channels('biformer_small')[2], num_classes=150))
