# 1x (12 epochs) with AdamW, as the transformer backbones' official detection recipes; no weight decay
# on norms and relative position biases.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys=dict(rpb=dict(decay_mult=0.0))))
