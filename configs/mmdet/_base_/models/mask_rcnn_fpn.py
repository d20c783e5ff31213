# Mask R-CNN + FPN on an attnzoo backbone: mmdet's R-50 model with the backbone swapped.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['attnzoo.heads.mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='AttnZooBackbone', model_name=None, out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=None))
