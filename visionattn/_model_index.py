"""Every registered model: (name, task, timm name), in ``visionattn.list_models()`` order.

Generated from the registry, so that ``visionattn list`` runs without importing torch; a test
checks it is current. After adding or renaming a model, rewrite it with
``python -c 'import visionattn.cli as c; c.write_model_index()'``.
"""

MODELS = (
    ('activator_cifar', 'classification', 'va_activator_cifar'),
    ('activator_glu_cifar', 'classification', 'va_activator_glu_cifar'),
    ('activator_s16_224', 'classification', 'va_activator_s16_224'),
    ('agunet_2d', 'segmentation', None),
    ('agunet_3d', 'segmentation', None),
    ('biformer_base', 'classification', 'va_biformer_base'),
    ('biformer_small', 'classification', 'va_biformer_small'),
    ('biformer_stl', 'classification', 'va_biformer_stl'),
    ('biformer_tiny', 'classification', 'va_biformer_tiny'),
    ('convit_base', 'classification', 'va_convit_base'),
    ('convit_base_plus', 'classification', 'va_convit_base_plus'),
    ('convit_small', 'classification', 'va_convit_small'),
    ('convit_small_plus', 'classification', 'va_convit_small_plus'),
    ('convit_tiny', 'classification', 'va_convit_tiny'),
    ('convit_tiny_plus', 'classification', 'va_convit_tiny_plus'),
    ('dagunet_2d', 'segmentation', None),
    ('dagunet_3d', 'segmentation', None),
    ('daunet_2d', 'segmentation', None),
    ('daunet_3d', 'segmentation', None),
    ('dfir_detr', 'detection', None),
    ('emcad_pvt_v2_b0', 'segmentation', None),
    ('emcad_pvt_v2_b2', 'segmentation', None),
    ('gated_swinrmt_retention', 'classification', 'va_gated_swinrmt_retention'),
    ('gated_swinrmt_retention_cifar', 'classification', 'va_gated_swinrmt_retention_cifar'),
    ('gated_swinrmt_retention_small', 'classification', 'va_gated_swinrmt_retention_small'),
    ('gated_swinrmt_retention_tiny', 'classification', 'va_gated_swinrmt_retention_tiny'),
    ('gated_swinrmt_swat', 'classification', 'va_gated_swinrmt_swat'),
    ('gated_swinrmt_swat_cifar', 'classification', 'va_gated_swinrmt_swat_cifar'),
    ('gated_swinrmt_swat_small', 'classification', 'va_gated_swinrmt_swat_small'),
    ('gated_swinrmt_swat_tiny', 'classification', 'va_gated_swinrmt_swat_tiny'),
    ('herseg', 'segmentation', None),
    ('ninformer_b16_224', 'classification', 'va_ninformer_b16_224'),
    ('ninformer_cifar', 'classification', 'va_ninformer_cifar'),
    ('ninformer_s16_224', 'classification', 'va_ninformer_s16_224'),
    ('rtdetr_r18', 'detection', None),
)
