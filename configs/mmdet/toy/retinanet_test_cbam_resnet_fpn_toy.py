# RetinaNet on the shapes set (python tools/make_toy_data.py): tiny backbone and heads, CPU minutes.
_base_ = ['../_base_/models/retinanet_fpn.py', '../_base_/datasets/toy_detection.py',
          '../_base_/schedules/toy.py']
from attnzoo.heads import feature_channels  # noqa: E402  (in_channels from the model's feature_info)

model = dict(
    backbone=dict(model_name='test_cbam_resnet'),
    neck=dict(in_channels=feature_channels('test_cbam_resnet'), out_channels=64),
    bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2),
    test_cfg=dict(score_thr=0.0))  # keep every box: short runs score low
