#!/usr/bin/env bash
# Everything here that needs a CUDA GPU, in one command, logs under $OUT (default gpu_out/):
#   tests  - tests/test_training_gpu.py (fp16 training, xformers, adamw8bit, compile through triton)
#   style  - the README's training command on an SD1.5-architecture model at 512 px (bench/sd15_folder.py)
#   bench  - bench/train_gpu.py: SD1.5 at 512 px fp16, batch 1 and 4, ours against the reference; comes last, and
#            what follows it goes to train_gpu.py: `bench/on_gpu.sh bench --variants ours ours-xformers reference`
#
#   bench/on_gpu.sh tests style        # the default: tests style bench
#   TESTS_K=xformers bench/on_gpu.sh tests       # some of the tests (pytest -k)
#
# The machine needs torch, transformers, accelerate, tensorboard and peft (the reference's LoRA). Wheels of what it
# lacks (diffusers and its needs; xformers, bitsandbytes to test those) go in .whl/ and are installed first; see
# bench/train_gpu.py's docstring for the download command.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
[ $# -eq 0 ] && set -- tests style bench
status=0
while [ $# -gt 0 ]; do
    part=$1; shift
    case $part in
    tests)
        timeout 400 python3 -m pytest -q -rs --durations=8 -p no:cacheprovider -p no:logging tests/test_training_gpu.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$out/tests.log"
        status=$((status | PIPESTATUS[0])) ;;
    style)
        run=/tmp/sd15_run
        { timeout 120 python3 bench/sd15_folder.py /tmp/sd15 &&
          timeout 400 python3 -m accelerate.commands.launch --num_processes 1 train/style.py --model /tmp/sd15 \
              --images datasets/mozart_art --rank 4 --steps 200 --sample-every 100 --save-every 100 \
              --output $run --overwrite; } 2>&1 | tr '\r' '\n' | tee "$out/style.log"
        status=$((status | PIPESTATUS[0]))
        cp $run/samples/step-000200.png "$out/style_samples.png" 2>/dev/null
        cp $run/loss.png "$out/style_loss.png" 2>/dev/null ;;
    bench)
        timeout 560 python3 bench/train_gpu.py "$@" 2>&1 | tee "$out/train_gpu.log"
        status=$((status | PIPESTATUS[0]))
        shift $# ;;
    *) echo "unknown part: $part (tests, style, bench)"; exit 2 ;;
    esac
done
exit $status
