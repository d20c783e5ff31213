_base_ = ['_base_/models/mask_rcnn_fpn.py', 'mmdet::_base_/datasets/coco_instance.py',
          '_base_/schedules/schedule_1x_adamw.py', 'mmdet::_base_/default_runtime.py']
from attnzoo.heads import feature_channels  # noqa: E402  (in_channels from the model's feature_info)

# ImageNet weights converted by tools/convert_checkpoint.py; train from scratch with
# --cfg-options model.backbone.checkpoint=None
# n_win: 16 regions per side for detection, 8 for segmentation (official downstream configs)
model = dict(
    backbone=dict(model_name='biformer_small', drop_path_rate=0.3, n_win=16,
                  checkpoint='checkpoints/biformer_small.safetensors'),
    neck=dict(in_channels=feature_channels('biformer_small')))
