"""Validate custom resources (e.g. KServe's ServingRuntime, InferenceService) against the OpenAPI
schemas in their CustomResourceDefinitions, strictly: a field the schema does not declare is an
error (the API server would silently drop it), unless the schema preserves unknown fields.

usage: validate_crd.py CRD_DIR MANIFEST...   (needs PyYAML and jsonschema)"""
import pathlib
import sys

import jsonschema
import yaml


def closed(schema):
    """The schema with every object that lists its properties closed to others."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


schemas = {}
for path in pathlib.Path(sys.argv[1]).glob("*.yaml"):
    for crd in yaml.safe_load_all(path.read_text()):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = closed(v["schema"]["openAPIV3Schema"])
            # metadata is the API server's to check.
            schema.get("properties", {})["metadata"] = {"type": "object"}
            schemas[(f"{group}/{v['name']}", kind)] = schema

failed = 0
for manifest in sys.argv[2:]:
    for doc in yaml.safe_load_all(pathlib.Path(manifest).read_text()):
        if not doc:
            continue
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in schemas:
            continue
        errors = sorted(jsonschema.Draft7Validator(schemas[key]).iter_errors(doc), key=str)
        name = f"{manifest}: {key[1]} {doc['metadata']['name']}"
        if errors:
            failed += 1
            for e in errors:
                print(f"FAIL {name}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        else:
            print(f"ok   {name} against the {key[0]} CRD schema")
sys.exit(1 if failed else 0)
