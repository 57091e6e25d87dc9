"""Model zoo: DeepLab2's published kMaX checkpoints (registry.py) and cached downloads
(download.py); the command line also converts checkpoints (checkpoint/deeplab2_conversion.py).

    python -m deeplab2_kmax.model_zoo list
    python -m deeplab2_kmax.model_zoo download kmax_resnet50_coco_train
    python -m deeplab2_kmax.model_zoo convert --from=NAME_OR_DEEPLAB2_CKPT \
        --config_file=configs/coco/kmax_deeplab/kmax_meta_r50_os32.textproto --output=OUT/ckpt
"""
