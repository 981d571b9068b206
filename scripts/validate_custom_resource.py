#!/usr/bin/env python3
"""Validates custom resources against the openAPIV3Schema of their CRD, offline.

usage: validate_custom_resource.py CRD.yaml RESOURCE.yaml...  (needs PyYAML and jsonschema,
both dependencies of kubernetes-validate)
"""

import sys

import jsonschema
import yaml


def main(crd_path, resources):
    crd = yaml.safe_load(open(crd_path))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schemas = {f"{group}/{v['name']}": v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
    failed = 0
    for path in resources:
        for doc in yaml.safe_load_all(open(path)):
            if not doc or doc.get("kind") != kind:
                continue
            schema = schemas.get(doc.get("apiVersion"))
            if schema is None:
                print(f"{path}: {doc.get('apiVersion')} is not a version of {kind}")
                failed += 1
                continue
            errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
            for e in errors:
                print(f"{path}: {doc['metadata']['name']}: {'/'.join(map(str, e.path))}: {e.message}")
            failed += len(errors)
            if not errors:
                print(f"{path}: {kind} {doc['metadata']['name']} is valid")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
