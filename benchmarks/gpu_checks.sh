#!/usr/bin/env bash
# The checks that only a CUDA machine can run, as one script (CI has no GPU; the tests never need one).
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]      (default ./gpu_checks_out; needs torch with CUDA, one GPU is enough)
#
# 1. the CUDA loss test (tests/test_losses.py::test_device_agnostic_cuda: the energy score on the GPU equals the CPU);
# 2. prosmin_micro pretrained under torchrun with the NCCL backend, bf16 autocast ("auto" precision), then
#    digits_knn and digits_collapse evaluated on the GPU;
# 3. prosmin_vits16_in1k (ViT-S/16, K = 12000 head and predictor, 2 x 224 + 16 x 96 crops, batch 64, PIL multi-crop
#    with DataLoader workers) for a few steps on a generated ImageNet-layout folder (1000 classes x 1 image) under
#    torchrun/NCCL, and its checkpoint loaded strictly as the registry's prosmin_vits16;
# 4. bench_methods.py at the ViT-S/16 recipes: step time and peak GPU memory of ProSMin, DINO, iBOT, MoCo-v3
#    (the paper's Table 7), and bench_loss.py on the GPU;
# 5. bench_protocols.py --scale imagenet --device cuda: each ImageNet task's stage after extraction on the GPU.
# Runs from a checkout without installing (PYTHONPATH); a step that fails is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-gpu_checks_out}")
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PROSMIN_BENCH_OFFLINE=1 PROSMIN_BENCH_HOME="$out/home"
py=${PYTHON:-python3}
failed=()
check() {  # check NAME CMD...: run, time, log to $out/NAME.log, remember failures
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

nvidia-smi -L
$py -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, \
torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"

check cuda_loss $py -m pytest -q -p no:cacheprovider tests/test_losses.py -k cuda -rs

check nccl_micro $py -m torch.distributed.run --standalone --nproc_per_node=1 -m prosmin_bench pretrain \
  --recipe prosmin_micro --out "$out/prosmin_micro"
check nccl_joined grep "joined process group: rank 0 of 1 (local rank 0, nccl)" "$out/nccl_micro.log"
check eval_micro $py -m prosmin_bench run --model prosmin_micro --weights "$out/prosmin_micro/checkpoint.pt" \
  --task digits_knn --task digits_collapse --seeds 0 --device cuda --results "$out/results" --no-pretrain

$py - "$out/fake" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from prosmin_bench.data.folder import imagenet_wnids
root, rng = Path(sys.argv[1]) / "imagenet" / "train", np.random.default_rng(0)
for w in imagenet_wnids():  # the loader wants all 1000 class folders
    (root / w).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(root / w / f"{w}_0.JPEG", quality=90)
print("fake ImageNet train folder:", root)
EOF
check nccl_vits16 $py -m torch.distributed.run --standalone --nproc_per_node=1 -m prosmin_bench pretrain \
  --recipe prosmin_vits16_in1k --data-root "$out/fake" --out "$out/prosmin_vits16" --set run.max_steps=6 \
  --set data.num_workers=8 --set optim.batch_size=64
check load_vits16 $py -c "
import sys, torch; from prosmin_bench import get_model
m = get_model('prosmin_vits16', weights='$out/prosmin_vits16/checkpoint.pt', device='cuda')
x = torch.randn(2, 3, 224, 224, device='cuda')
with torch.no_grad(): f, (mu, sigma) = m(x), m.predictive(x)
print('prosmin_vits16 features', tuple(f.shape), f.device, 'mu', tuple(mu.shape), 'sigma mean', float(sigma.mean()))"

check bench_methods_vits16 $py benchmarks/bench_methods.py --scale imagenet --device cuda --steps 10 --warmup 3
check bench_loss $py benchmarks/bench_loss.py --device cuda
# The README's GPU column of the ImageNet protocol stages (issue 21): the torch low-shot solver and faiss on the GPU
check bench_protocols_cuda $py benchmarks/bench_protocols.py --scale imagenet --device cuda --json "$out/bench_protocols.json"

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
