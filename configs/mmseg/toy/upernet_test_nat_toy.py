# UPerNet on the shapes set (python tools/make_toy_data.py): tiny backbone and heads, CPU minutes.
_base_ = ['../_base_/models/upernet.py', '../_base_/datasets/toy_ade.py',
          '../_base_/schedules/toy.py', 'mmseg::_base_/default_runtime.py']
from attnzoo.heads import feature_channels  # noqa: E402  (in_channels from the model's feature_info)

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=(128, 128)),
    backbone=dict(model_name='test_nat'),
    decode_head=dict(in_channels=feature_channels('test_nat'), channels=64, num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=feature_channels('test_nat')[2], channels=32, num_classes=4,
                        norm_cfg=norm_cfg))
