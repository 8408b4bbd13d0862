"""Builds the HFS data directory from the official hl7.fhir.r5.core package.

HFS reads search parameters and compartment definitions from its data directory; the crate
ships neither. Both are bundled here from the package's SearchParameter-*.json and
CompartmentDefinition-*.json files (see shared research fhir.md §3).
usage: hfs-data.py <unpacked package dir> <output dir>
"""
import glob
import json
import os
import sys


def bundle(pattern):
    entries = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            resource = json.load(f)
        entries.append({"fullUrl": resource.get("url", ""), "resource": resource})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def main():
    package, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for pattern, name in [("SearchParameter-*.json", "search-parameters-r5.json"),
                          ("CompartmentDefinition-*.json", "compartment-definitions-r5.json")]:
        b = bundle(os.path.join(package, pattern))
        if not b["entry"]:
            sys.exit(f"no {pattern} in {package}")
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(b, f)
        print(f"{name}: {len(b['entry'])} entries", file=sys.stderr)


if __name__ == "__main__":
    main()
