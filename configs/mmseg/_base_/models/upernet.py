# UPerNet (+ FCN auxiliary head on stage 2) on an attnzoo backbone: mmseg's R-50 model with the
# backbone swapped. Leaves set backbone.model_name and the heads' in_channels from feature_channels().
_base_ = 'mmseg::_base_/models/upernet_r50.py'
custom_imports = dict(imports=['attnzoo.heads.mm'], allow_failed_imports=False)
model = dict(
    data_preprocessor=dict(size=(512, 512)),  # ADE20K crops; toy configs override it
    pretrained=None,
    backbone=dict(_delete_=True, type='AttnZooBackbone', model_name=None, out_indices=(0, 1, 2, 3)),
    decode_head=dict(in_channels=None),
    auxiliary_head=dict(in_channels=None))
