"""Real torchxrayvision through pie's xrv:NAME@WEIGHTS loader, in a venv of its own.

torchvision from PyPI does not import beside pie's pinned CPU torch 2.13.0, so this check runs in a
separate venv (here: python3.11 -m venv /tmp/xv; /tmp/xv/bin/pip install torch==2.14.1
torchvision==0.29.1 torchxrayvision pillow numpy) after `make demo` (it reads runs/demo's frames):

    /tmp/xv/bin/python benchmarks/xrv/check_real_xrv.py

A randomly initialised DenseNet of the published "densenet121-res224-all" architecture is saved as
xrv saves its weights (a pickled model), loaded through pie (network blocked), and its outputs are
compared with xrv's own documented pipeline (normalize, XRayCenterCrop, XRayResizer(224)).
Last run 2026-12-02, torchxrayvision 1.5.7: 18 labels, max |pie - xrv| 0.0046 (the resizers differ).
"""

import socket
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torchxrayvision as xrv
from PIL import Image

from pie_cli.evaluation.scorers import load_classifier

torch.manual_seed(0)
name = "densenet121-res224-all"
labels = xrv.models.model_urls[name]["labels"]
model = xrv.models.DenseNet(num_classes=len(labels))
for mod in model.modules():  # random but not degenerate
    if isinstance(mod, torch.nn.Linear):
        torch.nn.init.normal_(mod.weight, std=0.01)
model.pathologies = labels
torch.save(model, "/tmp/xrv-random.pt")
calls = []
orig = socket.socket.connect
clf = load_classifier(f"xrv:{name}@/tmp/xrv-random.pt", allow_pickle=True)
assert socket.socket.connect is orig
frames = [
    Image.open(p)
    for p in sorted(
        __import__("glob").glob(
            str(__import__("pathlib").Path(__file__).resolve().parents[2] / "runs/demo/frame_00*.png")
        )
    )[:3]
]
ours = clf.predict(frames)
# xrv's own documented pipeline on the same weights
m2 = xrv.models.DenseNet(num_classes=len(labels))
m2.load_state_dict(torch.load("/tmp/xrv-random.pt", weights_only=False).state_dict())
m2.op_threshs = torch.tensor(xrv.models.model_urls[name]["op_threshs"])
m2.eval()
tf = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])
xs = []
for f in frames:
    img = xrv.datasets.normalize(np.asarray(f.convert("L"), dtype=np.float32), 255)[None]
    xs.append(torch.from_numpy(tf(img)))
with torch.no_grad():
    theirs = m2(torch.stack(xs)).numpy()
print("labels", clf.labels[:4], len(clf.labels))
print(
    "max |ours - xrv pipeline|",
    float(np.abs(ours - theirs).max()),
    "outputs range",
    float(ours.min()),
    float(ours.max()),
)
try:
    load_classifier(f"xrv:{name}@/tmp/xrv-random.pt")
except Exception as e:
    print("without --allow-pickle:", e)
