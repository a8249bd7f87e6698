"""The Slicer extension's files, checked headless: module code, .ui files, CMake lists, requirements.

Without a running Slicer these tests check what can go wrong unseen until someone opens the
module: a syntax error, a ``self.ui.NAME`` the .ui lacks (or of another widget class), a
``SlicerParameterName`` that names no parameter, a Lib file missing from the CMake list (the
Slicer package would lack it), a requirement that would replace Slicer's own packages.

With the ``slicer-core`` wheel (Slicer's real MRML classes) the module files are imported and
their Logic runs the whole flow on a real scene: CT node -> core -> segmentation node for
AirwaySegmentation; CT and stage-1 segmentation -> attention, breaks, connection, centerlines and
a training pair for AirwayRefine (whose self-test also runs here).  Importing the module files
needs stand-ins for what only the Slicer application provides; see :func:`_slicer_stand_ins` for
exactly what is stubbed.
"""

from __future__ import annotations

import dataclasses

import ast
import importlib.metadata
import importlib.util
import json
import py_compile
import re
import sys
import time
import types
import unittest
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
#: Module folders: a top-level folder NAME holding NAME.py (AirwayRefine, AirwaySegmentation).
MODULE_DIRS = sorted(path.parent for path in ROOT.glob("*/*.py") if path.stem == path.parent.name)
SEGMENTATION_DIR = ROOT / "AirwaySegmentation"
REFINE_DIR = ROOT / "AirwayRefine"
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
REFINE_WIDGET_CLASSES = {
    "inputSelector": "qMRMLNodeComboBox",
    "inputSegmentationSelector": "qMRMLNodeComboBox",
    "modelPathLineEdit": "ctkPathLineEdit",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "attentionVolumeSelector": "qMRMLNodeComboBox",
    "showAttentionCheckBox": "QCheckBox",
    "deviceComboBox": "QComboBox",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "breaksTableWidget": "QTableWidget",
    "connectAllButton": "QPushButton",
    "connectSelectedButton": "QPushButton",
    "centerlinesFolderLineEdit": "ctkPathLineEdit",
    "exportCenterlinesButton": "QPushButton",
    "datasetFolderLineEdit": "ctkPathLineEdit",
    "trainingCaseNameLineEdit": "QLineEdit",
    "addToTrainingSetButton": "QPushButton",
}
REFINE_NODE_TYPES = {
    "inputSelector": ["vtkMRMLScalarVolumeNode"],
    "inputSegmentationSelector": ["vtkMRMLSegmentationNode"],
    "outputSegmentationSelector": ["vtkMRMLSegmentationNode"],
    "attentionVolumeSelector": ["vtkMRMLScalarVolumeNode"],
}
#: Per module: widget classes, node types of the selectors, options bound to a widget.
EXPECTED_WIDGETS = {
    "AirwaySegmentation": (EXPECTED_WIDGET_CLASSES, EXPECTED_NODE_TYPES,
                           {"inputVolume", "outputSegmentation", "device", "overlap", "keepAllComponents", "createProbability"}),
    "AirwayRefine": (REFINE_WIDGET_CLASSES, REFINE_NODE_TYPES,
                     {"inputVolume", "inputSegmentation", "outputSegmentation", "attentionVolume", "showAttention", "device",
                      "trainingCaseName"}),
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


def test_there_are_both_modules() -> None:
    assert MODULE_DIRS == [REFINE_DIR, SEGMENTATION_DIR]


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


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_widgets_have_the_classes_the_code_expects(folder: Path) -> None:
    classes, node_types_of, _ = EXPECTED_WIDGETS[folder.name]
    widgets = _ui_widgets(_ui_file(folder))
    assert {name: widgets[name].get("class") for name in classes} == classes
    for name, node_types in node_types_of.items():
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


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_parameter_widgets_cover_the_options(folder: Path) -> None:
    named = {_string_property(widget, "SlicerParameterName") for widget in _ui_widgets(_ui_file(folder)).values()}
    assert named >= EXPECTED_WIDGETS[folder.name][2]


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


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_cmake_lists_every_lib_file(folder: Path) -> None:
    text = (folder / "CMakeLists.txt").read_text()
    name = re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1)
    assert name == folder.name
    listed = [entry.replace("${MODULE_NAME}", name) for entry in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    lib = folder / f"{name}Lib"
    on_disk = {path.relative_to(folder).as_posix() for path in lib.rglob("*.py")}
    assert set(listed) == on_disk | {f"{name}.py"}


@pytest.mark.parametrize("folder", MODULE_DIRS, ids=lambda folder: folder.name)
def test_cmake_resources_exist_and_cover_the_resources_folder(folder: Path) -> None:
    text = (folder / "CMakeLists.txt").read_text()
    listed = {entry.replace("${MODULE_NAME}", folder.name) for entry in _cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    on_disk = {p.relative_to(folder).as_posix() for p in (folder / "Resources").rglob("*") if p.is_file()}
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


def _import_module_file(folder: Path, patch: pytest.MonkeyPatch) -> types.ModuleType:
    """NAME.py imported as module NAME, as Slicer imports scripted modules (so that another module can import it)."""
    spec = importlib.util.spec_from_file_location(folder.name, _module_file(folder))
    loaded = importlib.util.module_from_spec(spec)
    patch.setitem(sys.modules, folder.name, loaded)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture(scope="module")
def modules() -> dict[str, types.ModuleType]:
    """Both module files imported with the stand-ins (removed again after the tests); AirwayRefine imports AirwaySegmentation."""
    with pytest.MonkeyPatch.context() as patch:
        for name, stand_in in _slicer_stand_ins().items():
            patch.setitem(sys.modules, name, stand_in)
        yield {folder.name: _import_module_file(folder, patch) for folder in (SEGMENTATION_DIR, REFINE_DIR)}


@pytest.fixture(scope="module")
def module(modules) -> types.ModuleType:
    """AirwaySegmentation.py."""
    return modules["AirwaySegmentation"]


@pytest.fixture(scope="module")
def refine_module(modules) -> types.ModuleType:
    """AirwayRefine.py."""
    return modules["AirwayRefine"]


def test_device_choices_are_the_cores(module) -> None:
    from AirwaySegmentationLib.inference_settings import DEVICES

    assert [device.value for device in module.Device] == list(DEVICES)
    assert all(device.label() for device in module.Device)


def test_the_module_lists_the_bundled_catalogue(module) -> None:
    from AirwaySegmentationLib.catalogue import catalogue

    # The stage-1 models only: the connection models are AirwayRefine's.
    assert module.AirwaySegmentationLogic.bundledModels() == catalogue(task="segmentation")
    assert all(entry["task"] == "segmentation" for entry in module.AirwaySegmentationLogic.bundledModels())


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
    with pytest.raises(ValueError, match="no bundled segmentation model yet"):
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


def test_a_cancel_during_a_committing_write_keeps_the_written_result(module, tmp_path) -> None:
    """Cancel pressed while a training pair or centerline files are written: the files exist, so
    the task ends with their paths, not "cancelled"; a cancel before the write still stops it."""
    from AirwaySegmentationLib.progress import report

    def writer(request, progress, cancel):
        report(progress, 0.0, "writing")
        cancel.set()  # the user presses Cancel while the file is written
        (tmp_path / "written.txt").write_text("pair")
        report(progress, 1.0, "written")
        return tmp_path / "written.txt"

    task = module.BackgroundSegmentation("request", writer, commits=True)
    task.start()
    status = _wait(task)
    assert not status.cancelled and status.result == tmp_path / "written.txt" and status.error is None
    (tmp_path / "written.txt").unlink()
    task = module.BackgroundSegmentation("request", writer, commits=True)
    task.cancel()
    task.start()
    assert _wait(task).cancelled and not (tmp_path / "written.txt").exists()


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


# --- AirwayRefine: the Logic on a real MRML scene -----------------------------------------------


def _broken_airway_case():
    """A CT with an air tube along x in lung tissue, and stage-1 labels of it with a 6 mm gap.

    The labels hold class 2 before the gap (x < 28), class 3 after it (x >= 34) and a class-3
    false-positive ball in the tissue beside the tube: three pieces.  The grid is oblique and
    1 mm isotropic, so that the lumen oracle bridges the gap end to end (attention > 0.2).
    Returns the CT, the stage-1 labels and the gap's voxels.
    """
    from AirwaySegmentationLib.volume import Geometry, Volume
    from conftest import broken_tube_arrays

    c, s = np.cos(0.3), np.sin(0.3)
    geometry = Geometry(spacing_xyz=(1.0, 1.0, 1.0), origin_xyz=(-120.0, 35.5, 210.0), direction=(c, -s, 0, s, c, 0, 0, 0, -1))
    ct, labels, gap = broken_tube_arrays()
    return Volume(ct, geometry), Volume(labels, geometry), gap


@pytest.fixture
def broken_airway_scene(slicer_core, converter_rules):
    """A scene with the broken-airway CT and its stage-1 segmentation, and three slice views."""
    from AirwaySegmentationLib import mrml

    scene = slicer_core.vtkMRMLScene()
    ct, labels, gap = _broken_airway_case()
    ct_node = mrml.node_from_volume(ct, scene, "Chest CT")
    stage1_node = mrml.segmentation_node_from_labels(labels, scene, "Chest CT airway", reference_node=ct_node)
    slicer_core.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for orientation in ("Axial", "Sagittal", "Coronal"):
        view = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        view.SetOrientation(orientation)
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetBackgroundVolumeID(ct_node.GetID())
    return types.SimpleNamespace(scene=scene, ct=ct, labels=labels, gap=gap, ct_node=ct_node, stage1_node=stage1_node)


@pytest.fixture(scope="module")
def oracle(refine_module):
    return refine_module.AirwayRefineTest.lumenOracle()


@pytest.fixture
def refinement(refine_module, broken_airway_scene, oracle):
    case = broken_airway_scene
    return refine_module.AirwayRefineLogic().process(case.ct_node, case.stage1_node, model=oracle, device="cpu", showResult=False)


def test_break_table_rows(refine_module) -> None:
    record = {"id": 4, "gap_mm": None, "confidence": 0.31234, "connected": False, "merged": False,
              "component_voxels": [5120, 37], "position_lps_mm": [1.0, 2.0, 3.0]}
    bridged = {**record, "id": 5, "gap_mm": 6.04, "confidence": 0.98, "connected": True, "merged": True}
    refused = {**record, "id": 6, "gap_mm": 2.5, "confidence": 0.91, "rejected": "it would hang component 2 ..."}
    assert refine_module.breakTableRows([record, bridged, refused]) == [
        ["4", "-", "0.31", "no", "no", "5120 / 37"],  # NaN gap: the second piece lies beyond the patch
        ["5", "6.0", "0.98", "yes", "yes", "5120 / 37"],
        ["6", "2.5", "0.91", "refused", "no", "5120 / 37"],  # the widening guard refused its bridge
    ]


def test_refine_connects_the_known_break_into_a_new_node_and_shows_the_attention(refine_module, broken_airway_scene, oracle, refinement) -> None:
    from AirwayRefineLib.refine import refine_ct
    from AirwaySegmentationLib import mrml
    from AirwaySegmentationLib.inference_settings import InferenceSettings

    case = broken_airway_scene
    assert refinement.segmentation is not case.stage1_node and refinement.segmentation.GetName() == "Chest CT airway refined"
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    # The module adds nothing to the core's answer.
    expected = refine_ct(case.ct, case.labels, oracle, InferenceSettings(device="cpu"))
    refined = mrml.labels_from_segmentation_node(refinement.segmentation, case.ct).array_zyx
    np.testing.assert_array_equal(refined, expected.labels.array_zyx)
    assert refined[case.gap].all() and refined.max() == 3
    # The stage-1 segmentation is kept as it was.
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(case.stage1_node, case.ct).array_zyx, case.labels.array_zyx)

    attention = mrml.volume_from_node(refinement.attention)
    np.testing.assert_allclose(attention.array_zyx, expected.attention.array_zyx, atol=1e-6)
    np.testing.assert_allclose(attention.geometry.ijk_to_lps, case.ct.geometry.ijk_to_lps, atol=1e-9)
    for index in range(3):
        view = case.scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        assert (view.GetForegroundVolumeID(), view.GetForegroundOpacity()) == (refinement.attention.GetID(), 0.4)
        assert view.GetBackgroundVolumeID() == case.ct_node.GetID()

    breaks = refinement.breaks
    bridged = [b for b in breaks if b["connected"]]
    assert len(bridged) == 1 and bridged[0]["merged"] and refinement.result.merged_ids == [bridged[0]["id"]]
    assert all(not b["merged"] for b in breaks if not b["connected"])
    rows = refine_module.breakTableRows(breaks)
    assert len(rows) == len(breaks) and all(len(row) == len(refine_module.BREAK_TABLE_COLUMNS) for row in rows)
    assert rows[breaks.index(bridged[0])][1:5] == [f"{bridged[0]['gap_mm']:.1f}", f"{bridged[0]['confidence']:.2f}", "yes", "yes"]
    summary = refine_module.AirwayRefineLogic.summary(refinement)
    assert summary.startswith(f"{len(breaks)} breaks found, 1 bridged, 1 connected; 3 airway pieces, 2 after")


def test_connect_selected_or_none_refills_the_refined_node_only(refine_module, broken_airway_scene, refinement) -> None:
    from AirwaySegmentationLib import mrml
    from AirwaySegmentationLib.errors import AirwayInputError

    case = broken_airway_scene
    logic = refine_module.AirwayRefineLogic()
    bridged = next(b["id"] for b in refinement.breaks if b["connected"])
    unbridged = next(b["id"] for b in refinement.breaks if not b["connected"])

    def refined(r) -> np.ndarray:
        return mrml.labels_from_segmentation_node(r.segmentation, case.ct).array_zyx

    none = logic.connectBreaks(refinement, [], showResult=False)
    assert none.segmentation is refinement.segmentation and none.result.merged_ids == []
    assert not refined(none)[case.gap].any()
    assert not any(b["merged"] for b in none.breaks)
    assert refine_module.AirwayRefineLogic.summary(none).endswith("3 airway pieces, 3 after connecting (the largest is kept).")
    selected = logic.connectBreaks(none, [bridged], showResult=False)
    assert refined(selected)[case.gap].all() and selected.result.merged_ids == [bridged]
    np.testing.assert_array_equal(refined(selected), refinement.result.labels.array_zyx)
    with pytest.raises(AirwayInputError, match=f"Break {unbridged} has no predicted bridge"):
        logic.connectBreaks(selected, [unbridged], showResult=False)
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    np.testing.assert_array_equal(mrml.labels_from_segmentation_node(case.stage1_node, case.ct).array_zyx, case.labels.array_zyx)
    # The refined node deleted in the meantime: no "connected" into a node outside the scene.
    gone = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "deleted")
    case.scene.RemoveNode(gone)
    with pytest.raises(ValueError, match="'deleted' was deleted; run the refinement again"):
        logic.connectBreaks(dataclasses.replace(refinement, segmentation=gone), "all", showResult=False)


def test_refine_fills_chosen_nodes_but_never_an_input(refine_module, broken_airway_scene, oracle) -> None:
    case = broken_airway_scene
    logic = refine_module.AirwayRefineLogic()
    chosen = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my refined airway")
    attention = case.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my attention")
    request = logic.prepare(case.ct_node, case.stage1_node, model=oracle, device="cpu")
    result = logic.run(request)
    with pytest.raises(ValueError, match="input segmentation keeps the result before refinement"):
        logic.importResult(result, request, case.ct_node, case.stage1_node, outputSegmentation=case.stage1_node)
    with pytest.raises(ValueError, match="the CT cannot receive the attention"):
        logic.importResult(result, request, case.ct_node, case.stage1_node, attentionVolume=case.ct_node)
    refinement = logic.importResult(result, request, case.ct_node, case.stage1_node, chosen, attention,
                                    showAttention=False, showResult=False)
    assert (refinement.segmentation, refinement.attention) == (chosen, attention)
    assert (chosen.GetName(), attention.GetName()) == ("my refined airway", "my attention")
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2
    assert case.scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode").GetForegroundVolumeID() is None
    with pytest.raises(ValueError, match="Select the airway segmentation"):
        logic.prepare(case.ct_node, None, model=oracle)


def test_refine_in_the_background_then_import(refine_module, broken_airway_scene, oracle) -> None:
    case = broken_airway_scene
    logic = refine_module.AirwayRefineLogic()
    request = logic.prepare(case.ct_node, case.stage1_node, model=oracle, device="cpu")
    task = refine_module.BackgroundSegmentation(request, refine_module.AirwayRefineLogic.run)
    task.start()
    status = _wait(task)
    assert status.error is None, status.traceback
    assert status.fraction == 1.0 and status.message.startswith("1 of ") and status.message.endswith(" breaks connected")
    refinement = logic.importResult(status.result, request, case.ct_node, case.stage1_node, showResult=False)
    assert refinement.result.merged_ids and refinement.stage1 is request.stage1

    task = refine_module.BackgroundSegmentation(request, refine_module.AirwayRefineLogic.run)
    task.cancel()
    task.start()
    assert _wait(task).cancelled


def test_clicking_a_break_centres_the_slice_views_on_it(refine_module, broken_airway_scene, refinement) -> None:
    case = broken_airway_scene
    record = next(b for b in refinement.breaks if b["connected"])
    refine_module.AirwayRefineLogic.jumpToBreak(record, case.scene)
    x, y, z = record["position_lps_mm"]
    for index in range(case.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        slice_to_ras = case.scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").GetSliceToRAS()
        np.testing.assert_allclose([slice_to_ras.GetElement(row, 3) for row in range(3)], [-x, -y, z], atol=1e-9)


def test_centerlines_become_curves_a_model_and_files_in_one_folder(refine_module, broken_airway_scene, refinement, tmp_path: Path) -> None:
    from AirwayRefineLib.centerline import CENTERLINE_FILES
    from AirwaySegmentationLib.classes import AIRWAY_CLASSES

    case = broken_airway_scene
    logic = refine_module.AirwayRefineLogic()
    outputs = logic.exportCenterlines(refinement.segmentation, case.ct_node, str(tmp_path / "centerlines"))
    branches = outputs.tree.branches
    assert branches and len(outputs.curves) == len(branches)
    assert [p.name for p in outputs.files] == list(CENTERLINE_FILES) and all(p.is_file() for p in outputs.files)
    for branch, curve in zip(branches, outputs.curves):
        assert curve.GetName() == branch.name and curve.GetNumberOfControlPoints() == len(branch.points_xyz)
        assert curve.GetMeasurement("Radius") is not None and curve.GetLocked()
        np.testing.assert_allclose(curve.GetDisplayNode().GetSelectedColor(), AIRWAY_CLASSES[branch.airway_class - 1].color_rgb, atol=1e-6)
    polydata = outputs.model.GetPolyData()
    assert polydata.GetNumberOfLines() == len(branches)
    assert polydata.GetCellData().GetArray("Generation").GetNumberOfTuples() == len(branches)
    hierarchy = case.scene.GetSubjectHierarchyNode()
    assert hierarchy.GetItemName(outputs.folderItemId) == "Chest CT airway refined centerlines"
    for node in (outputs.model, *outputs.curves):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == outputs.folderItemId
    assert refine_module.AirwayRefineLogic.centerlineSummary(outputs).endswith(f"Files in {tmp_path / 'centerlines'}.")

    again = logic.exportCenterlines(refinement.segmentation, case.ct_node)  # replaces the earlier export
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsCurveNode") == len(again.curves) == len(branches)
    assert case.scene.GetNumberOfNodesByClass("vtkMRMLModelNode") == 1 and again.files == []
    empty = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    empty.GetSegmentation().AddEmptySegment("airway", "Airway")
    with pytest.raises(ValueError, match="holds no airway"):
        logic.exportCenterlines(empty, case.ct_node)


def test_the_corrected_segmentation_is_added_to_the_training_set(refine_module, broken_airway_scene, refinement, tmp_path: Path) -> None:
    from AirwaySegmentationLib import mrml
    from AirwaySegmentationLib.data import find_cases
    from AirwaySegmentationLib.errors import AirwayInputError
    from AirwaySegmentationLib.volume import read_volume

    case = broken_airway_scene
    logic = refine_module.AirwayRefineLogic()
    # A correction in the Segment Editor: the end of the tube becomes class 2.
    corrected = refinement.result.labels.array_zyx.copy()
    corrected[:, :, 56:][corrected[:, :, 56:] > 0] = 2
    mrml.segmentation_node_from_labels(refinement.result.labels.with_array(corrected), case.scene, "", node=refinement.segmentation)

    image_path, label_path = logic.addToTrainingSet(case.ct_node, refinement.segmentation, tmp_path / "dataset")
    assert (image_path.name, label_path.name) == ("Chest_CT_0000.nii.gz", "Chest_CT.nii.gz")
    assert [(c.name, c.image_path, c.label_path) for c in find_cases(tmp_path / "dataset")] == [("Chest_CT", image_path, label_path)]
    np.testing.assert_array_equal(read_volume(label_path).array_zyx, corrected)
    np.testing.assert_array_equal(read_volume(image_path).array_zyx, case.ct.array_zyx)

    request = logic.prepareTrainingPair(case.ct_node, refinement.segmentation, tmp_path / "dataset")
    assert request.name == "Chest_CT" and request.existing == [image_path, label_path] and not request.overwrite
    with pytest.raises(AirwayInputError, match="already has a case Chest_CT"):
        logic.runTrainingPair(request)
    assert logic.addToTrainingSet(case.ct_node, refinement.segmentation, tmp_path / "dataset", overwrite=True) == (image_path, label_path)
    named = logic.addToTrainingSet(case.ct_node, case.stage1_node, str(tmp_path / "dataset"), "patient 7 (stage 1)")
    assert named[1].name == "patient_7_stage_1.nii.gz"
    assert [c.name for c in find_cases(tmp_path / "dataset")] == ["Chest_CT", "patient_7_stage_1"]
    with pytest.raises(ValueError, match="Choose the dataset folder"):
        logic.prepareTrainingPair(case.ct_node, refinement.segmentation, "")
    # A fix painted into a segment the Segment Editor added is refused, not left out of the pair.
    added = refinement.segmentation.GetSegmentation().GetSegment("airway_class_2")
    added.SetName("Segment_4")
    added.SetTerminology("")
    with pytest.raises(AirwayInputError, match="'Segment_4' .* holds voxels but is not an airway segment"):
        logic.prepareTrainingPair(case.ct_node, refinement.segmentation, tmp_path / "dataset")


def test_the_modules_self_test_runs_on_a_slicer_core_scene(refine_module, slicer_core, converter_rules, monkeypatch) -> None:
    """AirwayRefineTest, the self-test Slicer runs, with a slicer-core scene as slicer.mrmlScene."""
    monkeypatch.setattr(refine_module.slicer, "mrmlScene", slicer_core.vtkMRMLScene(), raising=False)
    monkeypatch.setattr(refine_module.slicer, "app", types.SimpleNamespace(processEvents=lambda: None), raising=False)

    class SelfTest(refine_module.AirwayRefineTest, unittest.TestCase):
        def delayDisplay(self, message, msec=None) -> None:
            pass

    SelfTest("runTest").runTest()


def test_the_batch_example_calls_the_logic_as_it_is(module, refine_module) -> None:
    """examples/batch.py (run inside Slicer) compiles and passes only keywords the Logic methods take."""
    import ast
    import inspect

    path = ROOT / "examples" / "batch.py"
    tree = ast.parse(path.read_text())
    compile(tree, str(path), "exec")
    methods = {
        "process": [module.AirwaySegmentationLogic.process, refine_module.AirwayRefineLogic.process],
        "exportCenterlines": [refine_module.AirwayRefineLogic.exportCenterlines],
        "ensureDependencies": [module.AirwaySegmentationLogic.ensureDependencies],
    }
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    checked = [call for call in calls if call.func.attr in methods]
    for call in checked:  # a call fits one of the methods of its name (both modules' Logic has a process)
        assert any(
            all(keyword.arg in inspect.signature(method).parameters for keyword in call.keywords)
            for method in methods[call.func.attr]
        ), ast.unparse(call)
    assert len(checked) == 4
