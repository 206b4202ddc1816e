"""Render the kustomizations under k8s/ without kubectl, and validate every manifest they produce.

    python k8s/check.py                           # validate every kustomization and stand-alone manifest
    python k8s/check.py overlays/gpu/rayjob       # print what `kubectl apply -k k8s/overlays/gpu/rayjob` sends

Choices:
- A minimal kustomize, enough for these manifests and no more: `resources` (files, multi-document, or
  directories holding a kustomization.yaml), `namespace`, and `patches` given as JSON6902 operation lists
  (add, replace, remove, test) with a `target` (group, version, kind, name). Any other kustomization field is
  an error, so nothing is silently skipped; tests/test_k8s_manifests.py compares the output with what
  `kubectl kustomize` rendered (committed under tests/data/kustomize/).
- RayCluster and RayJob are checked against the v1 openAPIV3Schema of KubeRay's own CRD files (k8s/schemas/,
  as released; descriptions stripped when loaded), made strict the way `kubectl apply` (server-side field
  validation: Strict) treats them: an unknown field is an error, not pruned. CEL rules
  (x-kubernetes-validations) are not evaluated. Their embedded pod templates and metadata also go through
  kubernetes-validate as core objects.
- Core kinds are checked by kubernetes-validate (strict) for Kubernetes KUBERNETES_VERSION.
- Beyond schemas, `check_invariants` enforces what a schema cannot: /dev/shm is a memory emptyDir in every
  Ray pod, extended resources (nvidia.com/gpu) sit in limits, credentials come from Secrets, Ray images match
  rayVersion, the RayJob's runtimeEnvYAML parses as a Ray runtime env.
Errors are one line each: `<source>: <Kind>/<name>: <what is wrong> (at <path>)`.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

K8S_DIR = Path(__file__).resolve().parent
SCHEMA_DIR = K8S_DIR / "schemas"  # KubeRay's CRDs, verbatim (k8s/schemas/README.md)
KUBERNETES_VERSION = "1.33.0"  # one kubernetes-validate ships; recent managed clusters run 1.33+
CLUSTER_SCOPED = {
    "Namespace",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SENSITIVE_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "patches"}


class ManifestError(ValueError):
    """A manifest or kustomization that cannot be rendered; the message is one line naming the file."""


@dataclass
class Manifest:
    """One Kubernetes object and where it came from (a kustomization directory or a file)."""

    obj: dict
    source: str

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "?")

    @property
    def name(self) -> str:
        return (self.obj.get("metadata") or {}).get("name", "?")

    def label(self) -> str:
        return f"{self.source}: {self.kind}/{self.name}"


@dataclass
class Report:
    """What `validate_all` found: the rendered kustomizations and every error, one line each."""

    rendered: dict[str, list[Manifest]] = field(default_factory=dict)
    standalone: list[Manifest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- JSON6902


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ManifestError(f"JSON pointer {path!r}: expected it to start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _child(node, key: str, path: str):
    if isinstance(node, list):
        if not key.isdigit() or int(key) >= len(node):
            raise ManifestError(f"JSON pointer {path!r}: no list index {key!r}")
        return node[int(key)]
    if not isinstance(node, dict) or key not in node:
        raise ManifestError(f"JSON pointer {path!r}: no field {key!r}")
    return node[key]


def _apply_op(doc: dict, op: dict) -> None:
    """One RFC 6902 operation, in place."""
    kind, path = op.get("op"), op.get("path", "")
    keys = _pointer(path)
    if not keys:
        raise ManifestError(f"op {kind!r} on the whole document is not supported")
    parent = doc
    for key in keys[:-1]:
        parent = _child(parent, key, path)
    last = keys[-1]
    slot = int(last) if isinstance(parent, list) and last.isdigit() else last
    if kind == "test":
        if _child(parent, last, path) != op.get("value"):
            raise ManifestError(
                f"test failed at {path}: expected {op.get('value')!r}, got {_child(parent, last, path)!r}"
            )
    elif kind in ("remove", "replace"):
        _child(parent, last, path)  # must exist
        if kind == "remove":
            del parent[slot]
        else:
            parent[slot] = copy.deepcopy(op["value"])
    elif kind == "add" and isinstance(parent, list):
        index = len(parent) if last == "-" else slot
        if not isinstance(index, int) or index > len(parent):
            raise ManifestError(f"add at {path}: expected a list index <= {len(parent)} or '-'")
        parent.insert(index, copy.deepcopy(op["value"]))
    elif kind == "add" and isinstance(parent, dict):
        parent[last] = copy.deepcopy(op["value"])
    else:
        raise ManifestError(f"unsupported op {kind!r} at {path} (add, replace, remove, test on objects and lists)")


def apply_json_patch(doc: dict, ops: list[dict], where: str = "patch") -> dict:
    """RFC 6902 add / replace / remove / test applied to a copy of `doc`; a failing op raises ManifestError."""
    if not isinstance(ops, list):
        raise ManifestError(f"{where}: expected a list of JSON6902 operations, got {type(ops).__name__}")
    doc = copy.deepcopy(doc)
    for op in ops:
        try:
            _apply_op(doc, op)
        except (ManifestError, KeyError) as exc:
            raise ManifestError(f"{where}: {exc}") from None
    return doc


# ---------------------------------------------------------------------------------------------- kustomize


def _load_docs(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise ManifestError(f"{path}: expected Kubernetes objects with apiVersion and kind")
    return docs


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    want = {"kind": obj.get("kind"), "name": obj["metadata"].get("name"), "group": group, "version": version}
    return all(want.get(k) == v for k, v in target.items())


def render(kdir: Path) -> list[dict]:
    """The objects `kubectl kustomize kdir` produces (for the subset of kustomize described above)."""
    kdir = Path(kdir)
    kfile = kdir / "kustomization.yaml"
    if not kfile.is_file():
        raise ManifestError(f"{kdir}: expected a kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    if unknown := set(k) - KUSTOMIZATION_FIELDS:
        raise ManifestError(
            f"{kfile}: unsupported fields {sorted(unknown)} (this renderer implements "
            f"resources, namespace and JSON6902 patches)"
        )
    objs: list[dict] = []
    for res in k.get("resources") or []:
        path = (kdir / res).resolve()
        objs += render(path) if path.is_dir() else _load_docs(path)
    for i, patch in enumerate(k.get("patches") or []):
        where = f"{kfile} patches[{i}]"
        target = patch.get("target") or {}
        if not target or set(target) - {"group", "version", "kind", "name"}:
            raise ManifestError(f"{where}: expected a target with group/version/kind/name, got {target!r}")
        ops = yaml.safe_load((kdir / patch["path"]).read_text()) if "path" in patch else yaml.safe_load(patch["patch"])
        hits = [j for j, o in enumerate(objs) if _matches(o, target)]
        if not hits:
            raise ManifestError(f"{where}: target {target} matches no resource")
        for j in hits:
            objs[j] = apply_json_patch(objs[j], ops, where)
    if ns := k.get("namespace"):
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = ns
    seen = set()
    for o in objs:
        key = (o["kind"], o["metadata"].get("namespace"), o["metadata"].get("name"))
        if key in seen:
            raise ManifestError(f"{kfile}: resource {key[0]}/{key[2]} appears twice")
        seen.add(key)
    return objs


def kustomization_dirs(root: Path = K8S_DIR) -> list[Path]:
    return sorted(p.parent for p in root.rglob("kustomization.yaml"))


def _kustomize_inputs(kdir: Path) -> set[Path]:
    """Files a kustomization reads (resources, recursively, and patches)."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text()) or {}
    out = {kdir / "kustomization.yaml"}
    for res in k.get("resources") or []:
        path = (kdir / res).resolve()
        out |= _kustomize_inputs(path) if path.is_dir() else {path}
    out |= {(kdir / p["path"]).resolve() for p in k.get("patches") or [] if "path" in p}
    return out


def standalone_manifests(root: Path = K8S_DIR) -> list[Manifest]:
    """YAML files under k8s/ that no kustomization reads (e.g. secret.example.yaml)."""
    used = set().union(*(_kustomize_inputs(d) for d in kustomization_dirs(root)))
    out = []
    for path in sorted(root.rglob("*.yaml")):
        if path.resolve() not in used and path.parent != SCHEMA_DIR:
            out += [Manifest(d, str(path.relative_to(root))) for d in _load_docs(path)]
    return out


# ---------------------------------------------------------------------------------------------- schemas


def strict_openapi(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as strict JSON Schema: objects with `properties` reject unknown fields
    (unless x-kubernetes-preserve-unknown-fields), `nullable` admits null."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strict_openapi(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict_openapi(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict_openapi(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict_openapi(x) for x in s[key]]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


def _strip_descriptions(x):
    if isinstance(x, dict):
        return {k: _strip_descriptions(v) for k, v in x.items() if k != "description"}
    if isinstance(x, list):
        return [_strip_descriptions(v) for v in x]
    return x


def load_crd(kind: str) -> dict:
    """KubeRay's CustomResourceDefinition of `kind` from k8s/schemas/ (1-2 MB of YAML: the C loader where present)."""
    path = SCHEMA_DIR / CRD_FILES[kind]
    if not path.is_file():
        raise ManifestError(f"{path}: missing; copy it from the KubeRay release named in {SCHEMA_DIR / 'README.md'}")
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def crd_v1_schema(crd: dict) -> dict:
    """The v1 openAPIV3Schema of a CustomResourceDefinition, descriptions stripped."""
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if "v1" not in versions:
        raise ManifestError(f"CRD {crd['metadata']['name']}: no v1 version")
    return _strip_descriptions(versions["v1"]["schema"]["openAPIV3Schema"])


_VALIDATORS: dict = {}


def crd_validator(kind: str):
    if kind not in _VALIDATORS:
        import jsonschema

        schema = strict_openapi(crd_v1_schema(load_crd(kind)))
        _VALIDATORS[kind] = jsonschema.Draft4Validator(schema)
    return _VALIDATORS[kind]


def _where(error) -> str:
    return "/" + "/".join(str(p) for p in error.absolute_path)


def _core_errors(obj: dict, label: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{label}: {exc.message} (at {_where(exc)})"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{label}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {KUBERNETES_VERSION}"]
    return []


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(JSON path, pod template) for every pod template inside a workload or Ray object."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
        prefix = "/spec/rayClusterSpec"
    elif obj.get("kind") == "RayCluster":
        prefix = "/spec"
    else:
        return [("/spec/template", spec["template"])] if "template" in spec else []
    out = [(f"{prefix}/headGroupSpec/template", spec.get("headGroupSpec", {}).get("template", {}))]
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        out.append((f"{prefix}/workerGroupSpecs/{i}/template", group.get("template", {})))
    return out


def schema_errors(m: Manifest) -> list[str]:
    """Schema validation of one object: the KubeRay CRD schema for Ray kinds, kubernetes-validate otherwise."""
    obj, label = m.obj, m.label()
    if m.kind not in CRD_FILES:
        return _core_errors(obj, label)
    if obj.get("apiVersion") != "ray.io/v1":
        return [f"{label}: expected apiVersion ray.io/v1, got {obj.get('apiVersion')!r}"]
    errors = [f"{label}: {e.message} (at {_where(e)})" for e in crd_validator(m.kind).iter_errors(obj)]
    # metadata is a bare `object` in the CRD schema: check it as ObjectMeta, pod templates as core PodTemplates.
    errors += _core_errors(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}, f"{label} metadata"
    )
    for path, template in pod_templates(obj):
        errors += _core_errors(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
            f"{label} {path}",
        )
    return errors


# ---------------------------------------------------------------------------------------------- invariants


def _containers(template: dict) -> list[dict]:
    spec = template.get("spec") or {}
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def _shm_errors(label: str, path: str, template: dict) -> list[str]:
    spec = template.get("spec") or {}
    memory_vols = {v["name"] for v in spec.get("volumes") or [] if (v.get("emptyDir") or {}).get("medium") == "Memory"}
    ray = (spec.get("containers") or [{}])[0]
    mounts = {vm["name"] for vm in ray.get("volumeMounts") or [] if vm.get("mountPath") == "/dev/shm"}
    if not mounts & memory_vols:
        return [
            f"{label}: container {ray.get('name')!r} has no emptyDir(medium: Memory) mounted at /dev/shm (at {path})"
        ]
    return []


def _resource_errors(label: str, path: str, template: dict) -> list[str]:
    errors = []
    for c in _containers(template):
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        for name in set(req) | set(lim):
            if "/" in name and str(req.get(name, lim.get(name))) != str(lim.get(name)):
                errors.append(
                    f"{label}: container {c['name']!r}: extended resource {name} must be in limits "
                    f"(and equal to its request), got requests={req.get(name)!r} limits={lim.get(name)!r} "
                    f"(at {path})"
                )
    return errors


def _secret_errors(label: str, path: str, template: dict) -> list[str]:
    errors = []
    for c in _containers(template):
        for env in c.get("env") or []:
            if SENSITIVE_ENV.search(env["name"]) and "valueFrom" not in env:
                errors.append(
                    f"{label}: container {c['name']!r}: env {env['name']} is a literal; expected "
                    f"valueFrom.secretKeyRef (at {path})"
                )
            value = str(env.get("value", ""))
            if re.search(r"://[^/\s:@]+:[^/\s@$][^/\s@]*@", value):
                errors.append(
                    f"{label}: container {c['name']!r}: env {env['name']} embeds a literal password in a "
                    f"URI; expected $(VAR) references to secretKeyRef entries (at {path})"
                )
    return errors


def _ray_errors(m: Manifest) -> list[str]:
    label, errors = m.label(), []
    spec = m.obj["spec"]["rayClusterSpec"] if m.kind == "RayJob" else m.obj["spec"]
    version = str(spec.get("rayVersion", ""))
    for path, template in pod_templates(m.obj):
        image = ((template.get("spec") or {}).get("containers") or [{}])[0].get("image", "")
        if not re.search(rf":{re.escape(version)}(-|$)", image):
            errors.append(f"{label}: image {image!r} is not Ray {version} (rayVersion) (at {path})")
    if m.kind == "RayJob":
        errors += runtime_env_errors(m)
    return errors


def runtime_env_errors(m: Manifest) -> list[str]:
    """The RayJob's runtimeEnvYAML parsed and validated by Ray's own RuntimeEnv (no cluster needed)."""
    text = m.obj["spec"].get("runtimeEnvYAML")
    if text is None:
        return []
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"{m.label()}: runtimeEnvYAML is not valid YAML: {str(exc).splitlines()[0]}"]
    try:
        from ray.runtime_env import RuntimeEnv

        RuntimeEnv(**env)
    except ImportError:
        return []  # ray not installed where this runs: the YAML still parsed
    except Exception as exc:  # noqa: BLE001 - Ray raises TypeError/ValueError with a useful message
        return [f"{m.label()}: runtimeEnvYAML rejected by ray.runtime_env.RuntimeEnv: {exc}"]
    return []


def invariant_errors(m: Manifest) -> list[str]:
    errors = []
    if not DNS1123_LABEL.match(m.name):
        errors.append(
            f"{m.label()}: metadata.name must be a DNS-1123 label (lower-case alphanumerics and '-', "
            f"at most 63 characters)"
        )
    is_ray = m.kind in CRD_FILES
    for path, template in pod_templates(m.obj):
        if is_ray:
            errors += _shm_errors(m.label(), path, template)
        errors += _resource_errors(m.label(), path, template)
        errors += _secret_errors(m.label(), path, template)
    if is_ray:
        errors += _ray_errors(m)
    return errors


# ---------------------------------------------------------------------------------------------- driver


def validate_manifests(manifests: list[Manifest]) -> list[str]:
    errors = []
    for m in manifests:
        errors += schema_errors(m)
        errors += invariant_errors(m)
    return errors


def validate_all(root: Path = K8S_DIR) -> Report:
    report = Report()
    for kdir in kustomization_dirs(root):
        rel = str(kdir.relative_to(root))
        try:
            report.rendered[rel] = [Manifest(o, rel) for o in render(kdir)]
        except ManifestError as exc:
            report.errors.append(str(exc))
            continue
        report.errors += validate_manifests(report.rendered[rel])
    report.standalone = standalone_manifests(root)
    report.errors += validate_manifests(report.standalone)
    return report


def main(argv: list[str]) -> int:
    if len(argv) == 1:
        print(yaml.safe_dump_all(render(K8S_DIR / argv[0]), sort_keys=False), end="")
        return 0
    report = validate_all()
    for rel, manifests in report.rendered.items():
        print(f"{rel}: {', '.join(f'{m.kind}/{m.name}' for m in manifests)}")
    for m in report.standalone:
        print(f"{m.source}: {m.kind}/{m.name} (stand-alone)")
    for e in report.errors:
        print(f"error: {e}")
    print(f"{'FAILED' if report.errors else 'ok'}: {len(report.errors)} error(s)")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
