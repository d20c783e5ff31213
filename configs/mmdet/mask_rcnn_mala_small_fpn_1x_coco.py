_base_ = ['_base_/models/mask_rcnn_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
          '_base_/schedules/schedule_1x_adamw.py', 'mmdet::_base_/default_runtime.py']
from attnzoo.heads import feature_channels  # noqa: E402  (in_channels from the model's feature_info)

# ImageNet weights converted by tools/convert_checkpoint.py; train from scratch with
# --cfg-options model.backbone.checkpoint=None
model = dict(
    backbone=dict(model_name='mala_small', drop_path_rate=0.2,
                  checkpoint='checkpoints/mala_small.safetensors'),
    neck=dict(in_channels=feature_channels('mala_small')))
