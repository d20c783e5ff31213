_base_ = ['_base_/models/fpn.py', 'mmseg::_base_/datasets/ade20k.py',
          'mmseg::_base_/schedules/schedule_80k.py', 'mmseg::_base_/default_runtime.py']
from attnzoo.heads import feature_channels  # noqa: E402  (in_channels from the model's feature_info)

# ImageNet weights converted by tools/convert_checkpoint.py; train from scratch with
# --cfg-options model.backbone.checkpoint=None
model = dict(
    backbone=dict(model_name='nat_tiny', drop_path_rate=0.3, checkpoint='checkpoints/nat_tiny.safetensors'),
    neck=dict(in_channels=feature_channels('nat_tiny')),
    decode_head=dict(num_classes=150))
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001))
