# Source on the GPU machine: installs the carried wheels (.whl/) and pgttt itself under /tmp, no network.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/pgttt . || return 1
export PYTHONPATH=/tmp/pgttt:/tmp/site PYTHONUNBUFFERED=1
