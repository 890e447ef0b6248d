"""PyTorch eager training throughput for the same architectures as the engine's zoo (small-cnn,
CIFAR ResNet-18), same batch, optimiser and data sizes: prints one JSON line.
Usage: torch_train.py ARCH CxHxW STEPS [cpu|cuda]"""
import json, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F

arch, chw, steps = sys.argv[1], [int(v) for v in sys.argv[2].split("x")], int(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
c, h, w = chw


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(64 * (h // 4) * (w // 4), 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class Block(nn.Module):
    def __init__(self, i, o, s):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o)
        self.c2, self.b2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.sc = nn.Sequential() if s == 1 and i == o else nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.sc(x))


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        layers, i = [], 64
        for o, s in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [Block(i, o, s), Block(o, o, 1)]
            i = o
        self.layers, self.fc = nn.Sequential(*layers), nn.Linear(512, 10)

    def forward(self, x):
        x = self.layers(F.relu(self.b1(self.c1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


torch.manual_seed(0)
model = {"small-cnn": SmallCnn, "resnet18": ResNet18}[arch]().to(device).train()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
batch = 128
x = torch.randint(0, 256, (batch * steps, c, h, w), dtype=torch.uint8, device=device)
y = torch.randint(0, 10, (batch * steps,), device=device)


def run(n):
    perm = torch.randperm(x.shape[0], device=device)
    for s in range(n):
        idx = perm[s * batch:(s + 1) * batch]
        xb = x[idx].float() / 255.0
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()


run(3)
t = time.perf_counter()
run(steps)
sec = time.perf_counter() - t
print(json.dumps({"engine": "pytorch-eager", "arch": arch, "input": sys.argv[2], "batch": batch, "images": batch * steps,
                  "seconds": round(sec, 4), "images_per_second": round(batch * steps / sec, 1), "device": device,
                  "threads": torch.get_num_threads(), "torch": torch.__version__}))
