# Sourced by the GPU-call scripts (gpu_check.sh, gpu_throughput.sh) on the lent GPU machine: installs
# the carried wheels (.whl: megatron-core, fla-core) into /tmp/site, puts them and the repository on
# PYTHONPATH, and prints the GPU and the versions the run used.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
