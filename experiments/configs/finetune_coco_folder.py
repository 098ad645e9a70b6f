"""Fine-tune an official DETR checkpoint on your own COCO-format folder (the official repo's most asked-for use).

  python experiments/train.py --config experiments/configs/finetune_coco_folder.py \
      --config.data.source_kwargs.ann_file=mydata/annotations/instances_train.json \
      --config.data.train_kwargs.image_dir=mydata/train --config.data.val_kwargs.image_dir=mydata/val \
      --config.data.val_kwargs.ann_file=mydata/annotations/instances_val.json \
      --config.model.num_classes=3 --config.init.detr_checkpoint=detr-r50-e632da11.pth --workdir DIR

Everything but the class head is loaded from the checkpoint; the class head (num_classes + 1 outputs) is
re-initialised. Category ids of the folder may be sparse: they are mapped to 0..num_classes-1.

`finetune_coco_folder.py:cpu` is the same fine-tune at 96-128 px, for a laptop or a CPU machine: the COCO sizes
(buckets up to 1344x1344 at batch 8) need more memory than a 24 GB machine has, which a CPU run checks at start.
"""

from experiments.configs import coco_r50


def get_config(arg: str = ""):
    config = coco_r50.get_config("" if arg == "cpu" else arg)  # ":smoke" as coco_r50's
    config.num_epochs = 50
    config.batch_size = 8
    config.eval_batch_size = 8
    config.eval_every = 1000
    config.checkpoint_every = 500
    config.model.num_classes = 1  # set to your number of classes
    config.data.source = "coco_folder"
    # skip_bad_images: missing image files are dropped at start and unreadable ones skipped (counted, logged)
    # instead of stopping the run.
    config.data.source_kwargs = dict(ann_file="", label_space="contiguous", skip_bad_images=False)
    config.data.train_kwargs = dict(image_dir="")
    config.data.val_kwargs = dict(image_dir="", ann_file="")
    config.data.num_workers = 4
    config.optimizer.lr_drop_epochs = 40
    config.init.detr_checkpoint = ""  # e.g. detr-r50-e632da11.pth
    config.init.reinit_class_head = True
    if arg == "cpu":
        config.data.update(train_scales=(96, 112, 128), max_size=128, crop_resize_scales=(96,), crop_size=(64, 96),
                           eval_size=128, num_workers=2)
    return config
