# Semantic FPN on an attnzoo backbone: mmseg's R-50 model with the backbone swapped.
_base_ = 'mmseg::_base_/models/fpn_r50.py'
custom_imports = dict(imports=['attnzoo.heads.mm'], allow_failed_imports=False)
model = dict(
    data_preprocessor=dict(size=(512, 512)),  # ADE20K crops; toy configs override it
    pretrained=None,
    backbone=dict(_delete_=True, type='AttnZooBackbone', model_name=None, out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=None))
