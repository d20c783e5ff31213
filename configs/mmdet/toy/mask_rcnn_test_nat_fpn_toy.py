# Mask R-CNN on the shapes set (python tools/make_toy_data.py): tiny backbone and heads, CPU minutes.
_base_ = ['../_base_/models/mask_rcnn_fpn.py', '../_base_/datasets/toy_instance.py',
          '../_base_/schedules/toy.py']
from attnzoo.heads import feature_channels  # noqa: E402  (in_channels from the model's feature_info)

model = dict(
    backbone=dict(model_name='test_nat'),
    neck=dict(in_channels=feature_channels('test_nat'), out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=128, num_classes=3),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(in_channels=64, conv_out_channels=64, num_classes=3)),
    test_cfg=dict(rcnn=dict(score_thr=0.0)))  # keep every box: short runs score low
