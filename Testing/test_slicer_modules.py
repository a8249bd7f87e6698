"""The Slicer extension's files, checked headless: module code, .ui files, CMake lists, requirements.

Without a running Slicer these tests check what can go wrong unseen until someone opens the
module: a syntax error, a ``self.ui.NAME`` the .ui lacks (or of another widget class), a
``SlicerParameterName`` that names no parameter, a Lib file missing from the CMake list (the
Slicer package would lack it), a requirement that would replace Slicer's own packages.

With the ``slicer-core`` wheel (Slicer's real MRML classes) the module file is imported and its
Logic runs the whole flow on a real scene: CT node -> core -> segmentation node.  Importing the
module file needs stand-ins for what only the Slicer application provides; see
:func:`_slicer_stand_ins` for exactly what is stubbed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import py_compile
import re
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
#: Module folders: a top-level folder NAME holding NAME.py (AirwaySegmentation; AirwayRefine later).
MODULE_DIRS = sorted(path.parent for path in ROOT.glob("*/*.py") if path.stem == path.parent.name)
SEGMENTATION_DIR = ROOT / "AirwaySegmentation"
#: Packages Slicer ships (and torch, from the PyTorch extension): never in requirements.txt.
NOT_PIP_INSTALLED = {"numpy", "scipy", "simpleitk", "vtk", "torch"}
#: Core dependencies the module does not need inside Slicer (training configuration files only).
NOT_NEEDED_IN_SLICER = {"tomli"}

#: Classes the module code relies on (signals, properties, parameter-node connectors).
EXPECTED_WIDGET_CLASSES = {
    "inputSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "modelComboBox": "QComboBox",
    "modelPathLineEdit": "ctkPathLineEdit",
    "deviceComboBox": "QComboBox",
    "overlapSpinBox": "QDoubleSpinBox",
    "keepAllComponentsCheckBox": "QCheckBox",
    "createProbabilityCheckBox": "QCheckBox",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
}
EXPECTED_NODE_TYPES = {
    "inputSelector": ["vtkMRMLScalarVolumeNode"],
    "outputSegmentationSelector": ["vtkMRMLSegmentationNode"],
}


def _module_file(folder: Path) -> Path:
    return folder / f"{folder.name}.py"


def _ui_file(folder: Path) -> Path:
    return folder / "Resources" / "UI" / f"{folder.name}.ui"


def _ui_widgets(ui_path: Path) -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in ET.parse(ui_path).getroot().iter("widget")}


def _string_property(widget: ET.Element, name: str) -> str | None:
    element = widget.find(f"./property[@name='{name}']/string")
    return None if element is None else (element.text or "")


def _cmake_list(text: str, variable: str) -> list[str]:
    found = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, flags=re.DOTALL)
    assert found, f"set({variable} ...) not found"
    return [line.strip() for line in found.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def _uncommented(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


# --- module code and .ui files ------------------------------------------------------------


def test_there_is_a_segmentation_module() -> None:
    assert SEGMENTATION_DIR in MODULE_DIRS


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_module_file_compiles(folder: Path, tmp_path: Path) -> None:
    py_compile.compile(str(_module_file(folder)), cfile=str(tmp_path / "module.pyc"), doraise=True)


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_ui_file_parses_with_the_module_as_root(folder: Path) -> None:
    root = ET.parse(_ui_file(folder)).getroot().find("widget")
    assert (root.get("class"), root.get("name")) == ("qMRMLWidget", folder.name)


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_every_widget_the_code_uses_is_in_the_ui(folder: Path) -> None:
    used = set(re.findall(r"self\.ui\.(\w+)", _module_file(folder).read_text()))
    assert used, "the module uses no widget of its .ui"
    assert used - set(_ui_widgets(_ui_file(folder))) == set()


def test_widgets_have_the_classes_the_code_expects() -> None:
    widgets = _ui_widgets(_ui_file(SEGMENTATION_DIR))
    assert {name: widgets[name].get("class") for name in EXPECTED_WIDGET_CLASSES} == EXPECTED_WIDGET_CLASSES
    for name, node_types in EXPECTED_NODE_TYPES.items():
        assert [s.text for s in widgets[name].findall("./property[@name='nodeTypes']/stringlist/string")] == node_types


def _parameter_fields(module_path: Path) -> set[str]:
    """Annotated fields of the class decorated with @parameterNodeWrapper."""
    tree = ast.parse(module_path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            getattr(decorator, "id", None) == "parameterNodeWrapper" for decorator in node.decorator_list
        ):
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError(f"{module_path.name} has no @parameterNodeWrapper class")


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_every_slicer_parameter_name_is_a_parameter(folder: Path) -> None:
    named = {_string_property(w, "SlicerParameterName") for w in _ui_widgets(_ui_file(folder)).values()} - {None}
    assert named and named <= _parameter_fields(_module_file(folder))


def test_parameter_widgets_cover_the_options() -> None:
    named = {
        _string_property(widget, "SlicerParameterName"): name
        for name, widget in _ui_widgets(_ui_file(SEGMENTATION_DIR)).items()
    }
    assert named.keys() >= {"inputVolume", "outputSegmentation", "device", "overlap", "keepAllComponents", "createProbability"}


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_node_selectors_receive_the_scene(folder: Path) -> None:
    ui = ET.parse(_ui_file(folder)).getroot()
    selectors = {w.get("name") for w in ui.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver")
        for c in ui.iter("connection")
        if c.findtext("sender") == folder.name
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors <= connected


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_custom_widget_classes_are_declared(folder: Path) -> None:
    ui = ET.parse(_ui_file(folder)).getroot()
    used = {w.get("class") for w in ui.iter("widget") if not w.get("class").startswith("Q")}
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    assert used <= declared


# --- CMake ------------------------------------------------------------------------------------


def test_cmake_lists_every_lib_file() -> None:
    text = (SEGMENTATION_DIR / "CMakeLists.txt").read_text()
    name = re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1)
    assert name == SEGMENTATION_DIR.name
    listed = [entry.replace("${MODULE_NAME}", name) for entry in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    lib = SEGMENTATION_DIR / f"{name}Lib"
    on_disk = {path.relative_to(SEGMENTATION_DIR).as_posix() for path in lib.rglob("*.py")}
    assert set(listed) == on_disk | {f"{name}.py"}


def test_cmake_resources_exist_and_cover_the_resources_folder() -> None:
    text = (SEGMENTATION_DIR / "CMakeLists.txt").read_text()
    listed = {entry.replace("${MODULE_NAME}", SEGMENTATION_DIR.name) for entry in _cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    on_disk = {p.relative_to(SEGMENTATION_DIR).as_posix() for p in (SEGMENTATION_DIR / "Resources").rglob("*") if p.is_file()}
    assert listed == on_disk
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in _uncommented(text)


def test_extension_cmake_has_metadata_and_adds_every_module() -> None:
    text = (ROOT / "CMakeLists.txt").read_text()
    for variable in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert re.search(r'set\(EXTENSION_DEPENDS "[^"]*\bPyTorch\b[^"]*"\)', text)
    added = set(re.findall(r"add_subdirectory\((\w+)\)", _uncommented(text)))
    with_cmake = {folder.name for folder in MODULE_DIRS if (folder / "CMakeLists.txt").is_file()}
    assert added == with_cmake


# --- requirements ---------------------------------------------------------------------------


def _requirements() -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in (SEGMENTATION_DIR / "Resources" / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_requirements_leave_slicers_packages_and_torch_alone() -> None:
    names = {canonicalize_name(r.name) for r in _requirements()}
    assert names & {canonicalize_name(n) for n in NOT_PIP_INSTALLED} == set()


def test_requirements_cover_the_core_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {canonicalize_name(Requirement(r).name) for r in [*project["dependencies"], *project["optional-dependencies"]["torch"]]}
    needed -= {canonicalize_name(n) for n in NOT_PIP_INSTALLED | NOT_NEEDED_IN_SLICER}
    assert {canonicalize_name(r.name) for r in _requirements()} == needed


# --- the module file, imported headless ---------------------------------------------------


def _slicer_stand_ins() -> dict[str, types.ModuleType]:
    """Stand-ins for the modules only the Slicer application provides.

    Stubbed, and nothing else:

    - ``slicer``: its MRML classes (``vtkMRMLScalarVolumeNode``, ``vtkMRMLSegmentationNode``)
      are the real ones from ``slicer_core`` when the wheel is installed (empty placeholder
      classes otherwise); no ``slicer.app``, ``slicer.mrmlScene`` or ``slicer.util`` functions.
    - ``slicer.ScriptedLoadableModule``: the four base classes, empty.
    - ``slicer.util``: ``VTKObservationMixin``, empty.
    - ``slicer.parameterNodeWrapper``: ``parameterNodeWrapper`` returns the class unchanged;
      ``WithinRange`` keeps its arguments.
    - ``slicer.i18n``: ``tr`` and ``translate`` return the text.
    - ``qt``, ``ctk``: empty modules (only the Widget uses them).

    ``vtk`` is the real VTK.  The Logic methods under test use the scene of the nodes they are
    given, never ``slicer.mrmlScene``.
    """
    try:
        import slicer_core
    except ImportError:
        slicer_core = None

    slicer = types.ModuleType("slicer")

    def mrml_class(name: str):
        if slicer_core is not None and hasattr(slicer_core, name):
            return getattr(slicer_core, name)
        if name.startswith("vtkMRML"):
            return type(name, (), {})
        raise AttributeError(name)

    slicer.__getattr__ = mrml_class
    slicer.__path__ = []  # a package, so that "import slicer.packaging" fails with ImportError

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            pass

    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {}))

    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {})

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda minimum, maximum: ("WithinRange", minimum, maximum)

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    for name, module in (("ScriptedLoadableModule", scripted), ("util", util), ("parameterNodeWrapper", wrapper), ("i18n", i18n)):
        setattr(slicer, name, module)
    return {
        "slicer": slicer,
        "slicer.ScriptedLoadableModule": scripted,
        "slicer.util": util,
        "slicer.parameterNodeWrapper": wrapper,
        "slicer.i18n": i18n,
        "qt": types.ModuleType("qt"),
        "ctk": types.ModuleType("ctk"),
    }


@pytest.fixture(scope="module")
def module():
    """AirwaySegmentation.py imported with the stand-ins (removed again after the tests)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, stand_in in _slicer_stand_ins().items():
            patch.setitem(sys.modules, name, stand_in)
        spec = importlib.util.spec_from_file_location("AirwaySegmentation", _module_file(SEGMENTATION_DIR))
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        yield loaded


def test_device_choices_are_the_cores(module) -> None:
    from AirwaySegmentationLib.inference_settings import DEVICES

    assert [device.value for device in module.Device] == list(DEVICES)
    assert all(device.label() for device in module.Device)


def test_the_module_lists_the_bundled_catalogue(module) -> None:
    from AirwaySegmentationLib.catalogue import catalogue

    assert module.AirwaySegmentationLogic.bundledModels() == catalogue()


def _catalogue(folder: Path, models: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "catalogue.json").write_text(json.dumps({"catalogue_version": 1, "models": models}))
    return folder


def test_model_titles_show_expected_times_and_names_resolve_to_files(module, tmp_path: Path) -> None:
    logic = module.AirwaySegmentationLogic
    folder = _catalogue(tmp_path / "models", [
        {"name": "fast", "file": "fast.safetensors", "default": False, "cpu_seconds": 240, "gpu_seconds": 12.4},
        {"name": "best", "file": "best.safetensors", "default": True, "cpu_seconds": None, "gpu_seconds": None},
    ])
    entries = logic.bundledModels(folder)
    assert [logic.modelTitle(e) for e in entries] == [
        "fast (CPU 4 min, GPU 12 s)", "best (CPU not measured, GPU not measured)",
    ]
    assert logic.resolveModel("fast", modelsDir=folder) == str(folder / "fast.safetensors")
    assert logic.resolveModel(modelsDir=folder) == str(folder / "best.safetensors")
    assert logic.resolveModel("", "/data/mine.safetensors", modelsDir=folder) == "/data/mine.safetensors"
    with pytest.raises(ValueError, match="no bundled model named"):
        logic.resolveModel("missing", modelsDir=folder)
    with pytest.raises(ValueError, match="no bundled model yet"):
        logic.resolveModel(modelsDir=_catalogue(tmp_path / "empty", []))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "catalogue.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        logic.bundledModels(tmp_path / "broken")


def test_dependency_helpers(module) -> None:
    logic = module.AirwaySegmentationLogic
    requirements = logic.readRequirements(logic.requirementsPath())
    assert requirements == [str(r) for r in _requirements()]
    assert logic.isRequirementSatisfied("numpy>=1.0")
    assert not logic.isRequirementSatisfied("numpy<1.0")
    assert not logic.isRequirementSatisfied("no-such-distribution-airway-test")
    assert logic.isRequirementSatisfied("no-such-distribution-airway-test; python_version < '3'")
    assert f"numpy=={importlib.metadata.version('numpy')}" in logic.protectingConstraints()


# --- background execution (threads only, no MRML) -----------------------------------------


def _wait(task, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not (status := task.poll()).finished:
        assert time.monotonic() < deadline, "the background segmentation did not finish"
        time.sleep(0.01)
    return status


def test_background_segmentation_hands_back_result_progress_and_errors(module) -> None:
    from AirwaySegmentationLib.errors import AirwayInputError

    def runner(request, progress, cancel):
        progress(0.5, "half way")
        return ("labels of", request)

    task = module.BackgroundSegmentation("request", runner)
    task.start()
    status = _wait(task)
    assert (status.result, status.fraction, status.message) == (("labels of", "request"), 0.5, "half way")
    assert not status.cancelled and status.error is None

    def failing(request, progress, cancel):
        raise AirwayInputError("The CT is not in Hounsfield units.")

    task = module.BackgroundSegmentation("request", failing)
    task.start()
    status = _wait(task)
    assert isinstance(status.error, AirwayInputError) and "AirwayInputError" in status.traceback
    assert status.result is None and not status.cancelled


def test_cancel_stops_the_worker_between_steps(module) -> None:
    started = []

    def endless(request, progress, cancel):
        while True:  # the core checks cancel between windows; the progress callback raises Cancelled
            started.append(True)
            progress(0.1, "window")
            time.sleep(0.005)

    task = module.BackgroundSegmentation("request", endless)
    task.start()
    while not started:
        time.sleep(0.005)
    assert not task.cancelRequested
    task.cancel()
    status = _wait(task, timeout_s=10)
    assert status.cancelled and status.result is None and status.error is None


def test_a_late_cancel_discards_the_result(module) -> None:
    def runner(request, progress, cancel):
        cancel.set()  # the user pressed Cancel just as the work ended
        return "result"

    task = module.BackgroundSegmentation("request", runner)
    task.start()
    status = _wait(task)
    assert status.cancelled and status.result is None


# --- the Logic on a real MRML scene (slicer-core wheel) ---------------------------------------


@pytest.fixture(scope="module")
def slicer_core():
    return pytest.importorskip("slicer_core", reason="the slicer-core wheel (Slicer's MRML libraries) is not installed")


def _synthetic_chest_ct():
    """A 32 x 48 x 48 CT: air around a soft-tissue body, a lung box, a trachea-like air tube."""
    from AirwaySegmentationLib.volume import Geometry, Volume

    ct = np.full((32, 48, 48), -1000, dtype=np.int16)
    ct[:, 6:42, 6:42] = 40
    ct[6:26, 12:36, 10:38] = -850
    ct[2:28, 21:27, 21:27] = -1000
    geometry = Geometry(spacing_xyz=(1.5, 1.5, 2.5), origin_xyz=(-36.0, 20.0, -300.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    return Volume(ct, geometry)


@pytest.fixture
def scene_with_ct(slicer_core, converter_rules):
    from AirwaySegmentationLib import mrml

    scene = slicer_core.vtkMRMLScene()
    ct = _synthetic_chest_ct()
    return scene, ct, mrml.node_from_volume(ct, scene, "Chest CT")


def test_process_makes_three_named_coded_segments_equal_to_the_core(module, scene_with_ct, tiny_model) -> None:
    from AirwaySegmentationLib import mrml
    from AirwaySegmentationLib.classes import AIRWAY_CLASSES
    from AirwaySegmentationLib.inference_settings import InferenceSettings
    from AirwaySegmentationLib.segment import segment_ct

    scene, ct, ct_node = scene_with_ct
    outputs = module.AirwaySegmentationLogic().process(ct_node, model=tiny_model, device="cpu", createProbability=True)

    node = outputs.segmentation
    assert node.GetScene() is scene and node.GetName() == "Chest CT airway"
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in segments] == [c.name for c in AIRWAY_CLASSES]
    np.testing.assert_allclose([s.GetColor() for s in segments], [c.color_rgb for c in AIRWAY_CLASSES], atol=1e-6)
    assert all(f"SCT^{c.snomed_type[0]}^{c.snomed_type[1]}" in s.GetTerminology() for s, c in zip(segments, AIRWAY_CLASSES))
    assert segmentation.ContainsRepresentation("Closed surface")

    # The module adds nothing to the core's answer: the same labels, in the CT's geometry.
    expected = segment_ct(ct.array_zyx, ct.geometry, tiny_model, InferenceSettings(device="cpu"), keep_probability=True)
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(node, ct).array_zyx, expected.labels.array_zyx)
    probability = mrml.volume_from_node(outputs.probability)
    np.testing.assert_allclose(probability.array_zyx, expected.probability.array_zyx.astype(np.float32), atol=1e-3)
    display = outputs.probability.GetDisplayNode()
    assert (display.GetAutoWindowLevel(), display.GetWindow(), display.GetLevel()) == (0, 1.0, 0.5)
    assert set(outputs.timings_s) >= {"crop", "network", "postprocess"} and outputs.info["device"] == "cpu"
    assert module.AirwaySegmentationLogic.summary(outputs).startswith("Done in")


def test_process_fills_the_nodes_it_is_given(module, scene_with_ct, tiny_model) -> None:
    scene, _, ct_node = scene_with_ct
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my airway")
    probability = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my probability")
    logic = module.AirwaySegmentationLogic()
    for _ in range(2):  # a second run replaces the segments instead of adding nodes or segments
        outputs = logic.process(ct_node, chosen, model=tiny_model, device="cpu", createProbability=True,
                                probabilityVolume=probability, showResult=False)
    assert outputs.segmentation is chosen and outputs.probability is probability
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2
    assert chosen.GetName() == "my airway" and chosen.GetSegmentation().GetNumberOfSegments() == 3
    assert probability.GetName() == "my probability"
    assert probability.GetImageData().GetDimensions() == ct_node.GetImageData().GetDimensions()


def test_options_reach_the_core(module, scene_with_ct, monkeypatch) -> None:
    from AirwaySegmentationLib import segment
    from AirwaySegmentationLib.errors import AirwayInputError

    _, ct, ct_node = scene_with_ct
    logic = module.AirwaySegmentationLogic()
    request = logic.prepare(ct_node, model="model.safetensors", device="cpu", overlap=0.5, keepAllComponents=True)
    np.testing.assert_array_equal(request.ct.array_zyx, ct.array_zyx)
    assert (request.settings.overlap, request.settings.device, request.ctName) == (0.5, "cpu", "Chest CT")

    seen = {}
    monkeypatch.setattr(segment, "segment_ct", lambda *args, **kwargs: seen.update(kwargs))
    logic.run(request, progress=print, cancel="token")
    assert seen == {"keep_largest_component": False, "keep_probability": False, "progress": print, "cancel": "token"}
    with pytest.raises(AirwayInputError, match="overlap"):
        logic.prepare(ct_node, model="model.safetensors", overlap=1.0)


def test_background_run_then_import_on_the_main_thread(module, scene_with_ct, tiny_model) -> None:
    _, _, ct_node = scene_with_ct
    logic = module.AirwaySegmentationLogic()
    task = module.BackgroundSegmentation(logic.prepare(ct_node, model=tiny_model, device="cpu"))
    task.start()
    status = _wait(task)
    assert status.error is None, status.traceback
    assert status.fraction == 1.0
    outputs = logic.importResult(status.result, ct_node, showResult=False)
    assert outputs.segmentation.GetSegmentation().GetNumberOfSegments() == 3 and outputs.probability is None


def test_background_run_on_a_gpu(module, scene_with_ct, tiny_model) -> None:
    """The worker thread drives CUDA (torch allows it from any thread); skipped without a GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    _, _, ct_node = scene_with_ct
    logic = module.AirwaySegmentationLogic()
    task = module.BackgroundSegmentation(logic.prepare(ct_node, model=tiny_model, device="cuda"))
    task.start()
    status = _wait(task)
    assert status.error is None, status.traceback
    assert status.result.info["device"].startswith("cuda")
    assert logic.importResult(status.result, ct_node, showResult=False).segmentation.GetSegmentation().GetNumberOfSegments() == 3
