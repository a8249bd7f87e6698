"""AirwaySegmentation: three-class airway tree segmentation of a chest CT (stage 1), as a 3D Slicer module.

The file is thin on purpose: the Widget holds the GUI, the Logic turns MRML nodes into arrays
and back (``AirwaySegmentationLib.mrml``) and calls the headless core
(``AirwaySegmentationLib.segment.segment_ct``), which does all the work and runs without Slicer.
Nothing from ``AirwaySegmentationLib`` is imported at module load: its third-party packages
(torch, scikit-image, ...) may not be installed yet, and are installed on the first Apply.
"""

import enum
import importlib.metadata
import logging
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Oldest torch the core is tested with (pyproject.toml, extra ``torch``).
MINIMUM_TORCH_VERSION = "2.3"
#: Packages Slicer ships; installing the requirements must never replace them.
SLICER_OWNED_PACKAGES = ("numpy", "scipy", "SimpleITK", "vtk")


#
# AirwaySegmentation
#


class AirwaySegmentation(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Airway Tree Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["Airway tree segmentation contributors (open source, Apache-2.0)"]
        self.parent.helpText = _("""
Fully automatic, anatomy-aware segmentation of the airway tree in a chest CT with a deep network,
in three classes: trachea and main bronchi, lobar to segmental bronchi, smaller bronchi.
The segments are named, coloured and coded with SNOMED CT terms.
<ul>
<li>Pick the CT, a model (its expected time on CPU and GPU is shown) and press Apply; Apply turns
into Cancel while the network runs, and Slicer stays usable.</li>
<li>Keep all components (off by default) keeps every airway piece instead of the largest
connected tree: use it when the result goes to AirwayRefine, which reconnects broken branches.</li>
<li>On the first Apply the module asks to install what it needs: PyTorch (through the PyTorch
extension) and a few Python packages.</li>
</ul>
The same computation runs without Slicer: <code>airway segment --in CT --out DIR</code>.
See the <a href="https://github.com/airway-seg/SlicerAirwayTree#readme">documentation</a>
and the <a href="https://github.com/airway-seg/SlicerAirwayTree/issues">issue tracker</a>.
<br><br>
Not to be confused with the older <a href="https://github.com/Slicer/SlicerAirwaySegmentation">Airway
Segmentation extension</a> (seeded region growing), whose module has the same internal name
"AirwaySegmentation": install only one of the two extensions.
""")
        self.parent.acknowledgementText = _("""
The three airway classes follow DeepTree's anatomy-aware labels; networks, losses and metrics follow
the published methods named in the documentation (WingsNet, FR/AD U-Net, ATM'22 challenge metrics).
The module structure follows Slicer's scripted-module template, SlicerNNUnet and SlicerMONAIAuto3DSeg.
""")


#
# AirwaySegmentationParameterNode
#


class Device(enum.Enum):
    """Where the network runs (the core's ``InferenceSettings.device``)."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        """Text of the device combo box (read by Slicer's parameter-node GUI connector)."""
        return {"auto": _("Auto (GPU when available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


@parameterNodeWrapper
class AirwaySegmentationParameterNode:
    """The module's settings, saved with the scene.

    inputVolume - Chest CT in Hounsfield units.
    modelName - Bundled model (catalogue name); empty when modelFile is used.
    modelFile - A model file (NAME.safetensors with NAME.json beside it) used when modelName is empty.
    device - Where the network runs.
    overlap - Minimum overlap of neighbouring windows, as a share of the training patch.
    keepAllComponents - Keep every airway component (input for AirwayRefine) instead of the largest.
    createProbability - Also put the airway probability (0-1) into a volume node.
    outputSegmentation - Receives the three segments (created when empty).
    probabilityVolume - Receives the probability (created when empty and asked for).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    modelFile: str = ""
    device: Device = Device.AUTO
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.25
    keepAllComponents: bool = False
    createProbability: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    probabilityVolume: vtkMRMLScalarVolumeNode


#
# AirwaySegmentationWidget
#


class BackgroundTaskWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """What the widgets of both modules share (the scripted-module template's parts and the background work).

    A parameter node bound to the ``.ui``; work run in a :class:`BackgroundSegmentation` thread
    with a progress bar, Apply turning into Cancel, and the result handed to a callback on the
    main thread; the scene-close handling.  Subclasses call :meth:`_setupTaskUi` from
    ``setup`` and define ``onSceneStartClose``, ``onApply``, ``_updateGui`` and
    ``_showParametersInGui`` (what the connector does not bind); their parameter node has an
    ``inputVolume``.
    """

    #: How often the main thread looks at the background work (ms).
    POLL_INTERVAL_MS = 100
    #: Progress bar resolution.
    PROGRESS_STEPS = 1000
    #: Error shown when the work fails with an unexpected error (``{error}``: the error).
    FAILURE_MESSAGE = "The work failed: {error}"

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task: Optional["BackgroundSegmentation"] = None
        self._onTaskResult: Optional[Callable] = None
        self._pollTimer = None

    def _setupTaskUi(self, uiFile: str, logic) -> None:
        """Load the ``.ui``, set the Logic, the progress bar, the poll timer and the scene observers."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(uiFile))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        self.ui.statusLabel.text = ""
        self.ui.progressBar.setRange(0, self.PROGRESS_STEPS)
        self.ui.progressBar.hide()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

    def cleanup(self) -> None:
        """Called when the application closes: stop the worker before the nodes go."""
        self._stopTask(wait=True)
        self.removeObservers()

    def _reloadPackages(self, packages: tuple) -> None:
        """Developer mode's Reload: also reload the headless cores, not only the module file."""
        self._stopTask(wait=True)
        for name in [n for n in sys.modules if n.split(".")[0] in packages]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """The Logic's parameter node, with the scene's first volume as the input CT when none is set."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are connected here; the
            # rest (combo boxes filled at run time, path fields) by _showParametersInGui.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._showParametersInGui()
            self._updateGui()

    def onApplyButton(self) -> None:
        if self._task is None:
            self.onApply()
        else:
            self.onCancel()

    def onCancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling after the current step...")
        self._updateGui()

    def _startTask(self, request, runner: Callable, onResult: Callable, commits: bool = False) -> None:
        """Run ``runner(request, progress, cancel)`` in the background; ``onResult(result, request)`` gets its result.
        ``commits``: the runner writes files as its last step (:class:`BackgroundSegmentation`)."""
        self._task = BackgroundSegmentation(request, runner, commits=commits)
        self._onTaskResult = onResult
        self._task.start()
        self._pollTimer.start()
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Starting...")

    def _stopTask(self, wait: bool) -> None:
        if self._pollTimer:
            self._pollTimer.stop()
        if self._task is not None:
            self._task.cancel()
            if wait:
                self._task.join()
        self._task = None
        self._onTaskResult = None

    def _onPoll(self) -> None:
        """Main thread: show the worker's progress; when it is done, hand its result on."""
        if self._task is None:
            self._pollTimer.stop()
            return
        status = self._task.poll()
        self.ui.progressBar.value = round(status.fraction * self.PROGRESS_STEPS)
        self.ui.progressBar.setFormat(f"%p%  {status.message}")
        if not status.finished:
            return
        self._pollTimer.stop()
        request, onResult = self._task.request, self._onTaskResult
        self._task = None
        self._onTaskResult = None
        self.ui.progressBar.hide()
        try:
            if status.cancelled:
                self.ui.statusLabel.text = _("Cancelled.")
            elif status.error is not None:
                self.ui.statusLabel.text = _("Failed.")
                # The core's AirwayInputError (a ValueError) is one sentence meant for the user.
                if isinstance(status.error, ValueError):
                    slicer.util.errorDisplay(str(status.error))
                else:
                    slicer.util.errorDisplay(_(self.FAILURE_MESSAGE).format(error=status.error), detailedText=status.traceback)
            else:
                self.ui.statusLabel.text = _("Failed to show the result.")  # replaced on success
                with slicer.util.tryWithErrorDisplay(_("Failed to show the result."), waitCursor=True):
                    onResult(status.result, request)
        finally:
            self._updateGui()


class AirwaySegmentationWidget(BackgroundTaskWidget):
    """GUI: node selectors, options, Apply/Cancel and progress; the work is the Logic's."""

    FAILURE_MESSAGE = "The airway segmentation failed: {error}"

    def __init__(self, parent=None) -> None:
        BackgroundTaskWidget.__init__(self, parent)
        self._models: list = []

    def setup(self) -> None:
        self._setupTaskUi("UI/AirwaySegmentation.ui", AirwaySegmentationLogic())
        self._populateModels()
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self._onModelChanged)
        self.initializeParameterNode()

    def onReload(self) -> None:
        self._reloadPackages(("AirwaySegmentationLib",))

    def onSceneStartClose(self, caller, event) -> None:
        # The input and output nodes are about to disappear: a running result has nowhere to go.
        # The worker is not waited for: it stops at its next window and its result is dropped.
        self._stopTask(wait=False)
        self.setParameterNode(None)

    # --- models --------------------------------------------------------------------------

    def _populateModels(self) -> None:
        """One combo box item per bundled model (data: its name), then "Model file..." (data: "")."""
        self.ui.modelComboBox.clear()
        try:
            self._models = self.logic.bundledModels()
        except ValueError as error:
            self._models = []
            self.ui.statusLabel.text = str(error)
        for entry in self._models:
            self.ui.modelComboBox.addItem(AirwaySegmentationLogic.modelTitle(entry), entry["name"])
            index = self.ui.modelComboBox.count - 1
            self.ui.modelComboBox.setItemData(index, entry.get("description") or entry["name"], qt.Qt.ToolTipRole)
        self.ui.modelComboBox.addItem(_("Model file..."), "")

    def _showParametersInGui(self) -> None:
        name = self._parameterNode.modelName
        if not name and not self._parameterNode.modelFile:
            name = next((e["name"] for e in self._models if e.get("default")), self._models[0]["name"] if self._models else "")
        index = self.ui.modelComboBox.findData(name)
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.currentIndex = index if index >= 0 else self.ui.modelComboBox.count - 1
        self.ui.modelComboBox.blockSignals(wasBlocked)
        wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
        self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelFile
        self.ui.modelPathLineEdit.blockSignals(wasBlocked)
        self._onModelChanged()

    def _onModelChanged(self, *args) -> None:
        if not self._parameterNode:
            return
        name = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or ""
        self.ui.modelPathLineEdit.visible = not name
        self.ui.modelPathLabel.visible = not name
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.modelName = name
            self._parameterNode.modelFile = "" if name else self.ui.modelPathLineEdit.currentPath

    # --- state -----------------------------------------------------------------------------

    def _updateGui(self, caller=None, event=None) -> None:
        running = self._task is not None
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton, self.ui.advancedCollapsibleButton):
            widget.enabled = not running
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation (after the current window)")
            self.ui.applyButton.enabled = not self._task.cancelRequested
            return
        self.ui.applyButton.text = _("Apply")
        problems = []
        if not (self._parameterNode and self._parameterNode.inputVolume):
            problems.append(_("Select the input CT volume."))
        if self._parameterNode and not (self._parameterNode.modelName or self._parameterNode.modelFile):
            problems.append(_("Select a model or a model file."))
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = "\n".join(problems) or _("Segment the airway tree")

    def onApply(self) -> None:
        parameters = self._parameterNode
        self.ui.statusLabel.text = _("Checking the Python packages...")
        slicer.app.processEvents()
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to start the airway segmentation."), waitCursor=True):
                self.logic.ensureDependencies()
                self.ui.statusLabel.text = _("Reading the CT...")
                request = self.logic.prepare(
                    parameters.inputVolume,
                    model=self.logic.resolveModel(parameters.modelName, parameters.modelFile),
                    device=parameters.device.value,
                    overlap=parameters.overlap,
                    keepAllComponents=parameters.keepAllComponents,
                    createProbability=parameters.createProbability,
                )
                inputVolume = parameters.inputVolume
                self._startTask(request, AirwaySegmentationLogic.run,
                                lambda result, request: self._importResult(result, inputVolume))
        finally:
            if self._task is None:
                self.ui.statusLabel.text = _("Not started.")
            self._updateGui()

    def _importResult(self, result, inputVolume) -> None:
        parameters = self._parameterNode
        outputs = self.logic.importResult(
            result,
            inputVolume,
            outputSegmentation=parameters.outputSegmentation,
            probabilityVolume=parameters.probabilityVolume,
        )
        with slicer.util.NodeModify(parameters):
            parameters.outputSegmentation = outputs.segmentation
            if outputs.probability is not None:
                parameters.probabilityVolume = outputs.probability
        slicer.util.setSliceViewerLayers(background=inputVolume, fit=False)
        self.ui.statusLabel.text = AirwaySegmentationLogic.summary(outputs)


#
# Background execution
#


@dataclass
class SegmentationStatus:
    """What the main thread sees of a :class:`BackgroundSegmentation` at one poll."""

    fraction: float = 0.0
    message: str = ""
    finished: bool = False
    cancelled: bool = False
    result: Any = None
    error: Optional[BaseException] = None
    traceback: str = ""


class BackgroundSegmentation:
    """Runs :meth:`AirwaySegmentationLogic.run` in a worker thread; the main thread polls it.

    The worker gets plain data (a :class:`SegmentationRequest`: numpy arrays, settings) and
    hands back the core's ``SegmentationResult``; it touches neither MRML nor Qt.  Progress
    and the outcome cross threads under a lock; cancelling sets a ``threading.Event`` that the
    core checks between windows (and the progress callback between steps).

    Example::

        task = BackgroundSegmentation(request)
        task.start()
        while not (status := task.poll()).finished:  # in Slicer: a qt.QTimer calls poll()
            time.sleep(0.1)
        status.result.labels  # or status.error / status.cancelled
    """

    def __init__(self, request: "SegmentationRequest", runner: Optional[Callable] = None, *, commits: bool = False) -> None:
        self.request = request
        self._runner = runner or AirwaySegmentationLogic.run
        # A runner that writes files as its last step: once it has returned, the files exist,
        # so its final report (fraction 1) does not raise and a late cancel keeps the result.
        self._commits = commits
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._status = SegmentationStatus(message=_("Starting"))
        self._thread = threading.Thread(target=self._work, name="AirwaySegmentation", daemon=True)

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def poll(self) -> SegmentationStatus:
        """A copy of the current status (never blocks for longer than a progress update)."""
        with self._lock:
            return SegmentationStatus(**vars(self._status))

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            self._status.fraction = fraction
            self._status.message = message
        if self._cancel.is_set() and not (self._commits and fraction >= 1.0):
            from AirwaySegmentationLib.progress import Cancelled

            raise Cancelled(message)

    def _work(self) -> None:
        from AirwaySegmentationLib.progress import Cancelled

        outcome = {}
        try:
            outcome["result"] = self._runner(self.request, progress=self._progress, cancel=self._cancel)
        except Cancelled:
            outcome["cancelled"] = True
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which shows it
            outcome["error"] = error
            outcome["traceback"] = traceback.format_exc()
        with self._lock:
            for key, value in outcome.items():
                setattr(self._status, key, value)
            # A cancel that came too late to stop the work still discards the result, unless
            # the work committed files (then the result says where they are).
            if self._cancel.is_set() and self._status.error is None and not (self._commits and "result" in outcome):
                self._status.cancelled = True
                self._status.result = None
            self._status.finished = True


#
# AirwaySegmentationLogic
#


@dataclass
class SegmentationRequest:
    """Everything the worker needs, with no MRML in it (built by :meth:`AirwaySegmentationLogic.prepare`)."""

    ct: Any  # AirwaySegmentationLib.volume.Volume (HU, LPS geometry)
    ctName: str
    model: str  # a model file path (or a name the core's catalogue knows)
    settings: Any  # AirwaySegmentationLib.inference_settings.InferenceSettings
    keepAllComponents: bool = False
    createProbability: bool = False


@dataclass
class SegmentationOutputs:
    """The nodes a segmentation filled, with the core's timings and run information."""

    segmentation: Any  # vtkMRMLSegmentationNode
    probability: Any = None  # vtkMRMLScalarVolumeNode or None
    timings_s: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


class AirwaySegmentationLogic(ScriptedLoadableModuleLogic):
    """Segment the airway tree of a CT volume node; usable from the Python console without the GUI.

    Example (Slicer's Python console)::

        logic = slicer.util.getModuleLogic("AirwaySegmentation")
        logic.ensureDependencies()
        outputs = logic.process(slicer.util.getNode("CT"), device="auto")
        outputs.segmentation  # three named, coloured, SNOMED-coded segments

    :meth:`process` is :meth:`prepare` (main thread: node -> arrays), :meth:`run` (any thread:
    the headless core) and :meth:`importResult` (main thread: arrays -> nodes); the Widget
    runs the middle step in a :class:`BackgroundSegmentation`.  Only :meth:`ensureDependencies`
    and :meth:`getParameterNode` need the Slicer application; the rest works on the scene of
    the nodes it is given.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return AirwaySegmentationParameterNode(super().getParameterNode())

    # --- models ----------------------------------------------------------------------------

    @staticmethod
    def bundledModels(modelsDir: Optional[Path] = None) -> list:
        """The catalogue's entries (name, file, default, description, cpu_seconds, gpu_seconds); maybe none."""
        from AirwaySegmentationLib.catalogue import catalogue  # torch-free: the list shows before torch is installed

        return catalogue(modelsDir, "segmentation")

    @staticmethod
    def modelTitle(entry: dict) -> str:
        """Combo box text: the name and the expected time per CT on CPU and GPU."""

        def duration(seconds) -> str:
            if seconds is None:
                return _("not measured")
            seconds = float(seconds)
            return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"

        return _("{name} (CPU {cpu}, GPU {gpu})").format(
            name=entry["name"], cpu=duration(entry.get("cpu_seconds")), gpu=duration(entry.get("gpu_seconds"))
        )

    @staticmethod
    def resolveModel(modelName: str = "", modelFile: str = "", modelsDir: Optional[Path] = None) -> str:
        """The model file of a bundled model name, else the given model file, else the default bundled model."""
        from AirwaySegmentationLib.catalogue import default_model_name, model_file

        if modelName:
            return str(model_file(modelName, modelsDir))
        if modelFile:
            return str(modelFile)
        return str(model_file(default_model_name(modelsDir), modelsDir))

    # --- dependencies ----------------------------------------------------------------------

    @staticmethod
    def requirementsPath() -> Path:
        return Path(__file__).resolve().parent / "Resources" / "requirements.txt"

    @staticmethod
    def readRequirements(path: Path) -> list:
        """Requirement strings of a requirements file (comments, blank lines and pip options skipped)."""
        lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
        return [line for line in lines if line and not line.startswith("-")]

    @staticmethod
    def isRequirementSatisfied(requirement: str) -> bool:
        """Whether an installed distribution satisfies the requirement (or its marker excludes this Python)."""
        from packaging.requirements import Requirement

        parsed = Requirement(requirement)
        if parsed.marker is not None and not parsed.marker.evaluate():
            return True
        try:
            installed = importlib.metadata.version(parsed.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return parsed.specifier.contains(installed, prereleases=True)

    @staticmethod
    def protectingConstraints() -> list:
        """Pins to the installed versions of Slicer's own packages, so pip never replaces them."""
        pins = []
        for name in SLICER_OWNED_PACKAGES:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        return pins

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Install what the core needs and Slicer lacks, after asking: torch, then requirements.txt.

        torch comes from the PyTorch extension (it picks the CUDA or CPU build for this
        computer); the rest from pip, constrained so that numpy, scipy, SimpleITK and vtk stay
        the versions Slicer ships.  Raises RuntimeError when the user declines or it fails.
        """
        self._ensureTorch(askConfirmation)
        missing = [r for r in self.readRequirements(self.requirementsPath()) if not self.isRequirementSatisfied(r)]
        if missing:
            self._pipInstall(missing, askConfirmation)

    @classmethod
    def _ensureTorch(cls, askConfirmation: bool) -> None:
        requirement = f"torch>={MINIMUM_TORCH_VERSION}"
        if cls.isRequirementSatisfied(requirement):
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(
                "This module needs the PyTorch extension: install it with the Extensions Manager, restart Slicer and try again."
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            raise RuntimeError(
                f"PyTorch {importlib.metadata.version('torch')} is too old; use the PyTorch Utils module to install "
                f"torch {requirement.removeprefix('torch')} and restart Slicer."
            )
        logging.info("Installing PyTorch (this may take several minutes)")
        if torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}") is None:
            raise RuntimeError("PyTorch was not installed; the airway segmentation needs it.")

    def _pipInstall(self, requirements: list, askConfirmation: bool) -> None:
        constraints = Path(tempfile.mkdtemp(prefix="AirwaySegmentation-")) / "constraints.txt"
        constraints.write_text("\n".join(self.protectingConstraints()) + "\n", encoding="utf-8")
        try:
            import slicer.packaging as packaging  # Slicer >= 5.10
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(requirements, constraints=constraints, prompt_install=askConfirmation,
                                 requester="AirwaySegmentation")
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("The airway segmentation needs these Python packages; install them now (a few minutes)?"),
            windowTitle=_("Airway Tree Segmentation"),
            detailedText="\n".join(requirements),
        ):
            raise RuntimeError("The Python packages were not installed; the airway segmentation needs them.")
        slicer.util.pip_install(["-c", str(constraints), *requirements])

    # --- the three steps ---------------------------------------------------------------------

    def prepare(
        self,
        inputVolume,
        model: Optional[str] = None,
        device: str = "auto",
        overlap: float = 0.25,
        keepAllComponents: bool = False,
        createProbability: bool = False,
    ) -> SegmentationRequest:
        """Main thread: read the CT node and check the options, before any long work starts."""
        from AirwaySegmentationLib import mrml
        from AirwaySegmentationLib.infer import resolve_device
        from AirwaySegmentationLib.inference_settings import InferenceSettings

        if inputVolume is None:
            raise ValueError("Select the input CT volume.")
        settings = InferenceSettings(overlap=float(overlap), device=str(device))
        resolve_device(settings.device)  # a missing GPU is reported now, not after the crop
        return SegmentationRequest(
            ct=mrml.volume_from_node(inputVolume),
            ctName=inputVolume.GetName(),
            model=model if model is not None else self.resolveModel(),
            settings=settings,
            keepAllComponents=bool(keepAllComponents),
            createProbability=bool(createProbability),
        )

    @staticmethod
    def run(request: SegmentationRequest, progress=None, cancel=None):
        """Any thread: the headless core on the request's arrays; returns its ``SegmentationResult``."""
        from AirwaySegmentationLib.segment import segment_ct

        return segment_ct(
            request.ct.array_zyx,
            request.ct.geometry,
            request.model,
            request.settings,
            keep_largest_component=not request.keepAllComponents,
            keep_probability=request.createProbability,
            progress=progress,
            cancel=cancel,
        )

    def importResult(
        self,
        result,
        inputVolume,
        outputSegmentation=None,
        probabilityVolume=None,
        showResult: bool = True,
    ) -> SegmentationOutputs:
        """Main thread: put the core's labels (and probability) into nodes of the input's scene.

        ``outputSegmentation`` (if given) has its segments replaced; otherwise a new node is
        added.  The probability goes into ``probabilityVolume`` (or a new node) when the result
        has one.  ``showResult`` adds the closed-surface representation for the 3-D view.
        """
        from AirwaySegmentationLib import mrml

        scene = inputVolume.GetScene()
        if scene is None:
            raise ValueError(f"The CT {inputVolume.GetName()!r} was removed from the scene; load it and run again.")
        name = f"{inputVolume.GetName()} airway"
        segmentation = mrml.segmentation_node_from_labels(
            result.labels, scene, name, reference_node=inputVolume, node=outputSegmentation
        )
        if showResult:
            segmentation.CreateClosedSurfaceRepresentation()
        probability = None
        if result.probability is not None:
            probabilityName = probabilityVolume.GetName() if probabilityVolume is not None else f"{name} probability"
            probability = mrml.node_from_volume(result.probability, scene, probabilityName, node=probabilityVolume)
            self._showAsProbability(probability)
        return SegmentationOutputs(segmentation, probability, dict(result.timings_s), dict(result.info))

    def process(
        self,
        inputVolume,
        outputSegmentation=None,
        model: Optional[str] = None,
        device: str = "auto",
        overlap: float = 0.25,
        keepAllComponents: bool = False,
        createProbability: bool = False,
        probabilityVolume=None,
        showResult: bool = True,
        progress=None,
        cancel=None,
    ) -> SegmentationOutputs:
        """Segment the airway tree of ``inputVolume`` and wait for it (scripts, tests).

        Parameters
        ----------
        inputVolume : vtkMRMLScalarVolumeNode
            Chest CT in Hounsfield units.
        outputSegmentation : vtkMRMLSegmentationNode, optional
            Receives the three segments (None: a new node).
        model : str, optional
            Model file (``NAME.safetensors``) or bundled name; None: the bundled default.
        device : {"auto", "cpu", "cuda"}
        overlap : float
            Minimum window overlap, share of the training patch, in [0, 1).
        keepAllComponents : bool
            Keep every airway component (for AirwayRefine) instead of the largest.
        createProbability : bool
            Also fill a probability volume (``probabilityVolume`` or a new node).
        showResult : bool
            Add the closed-surface representation (3-D display).
        progress, cancel
            ``progress(fraction, message)`` and an object with ``is_set()``, as the core takes them.

        Returns
        -------
        SegmentationOutputs
        """
        start = time.perf_counter()
        request = self.prepare(inputVolume, model, device, overlap, keepAllComponents, createProbability)
        result = self.run(request, progress=progress, cancel=cancel)
        outputs = self.importResult(result, inputVolume, outputSegmentation, probabilityVolume, showResult)
        logging.info(f"Airway segmentation done in {time.perf_counter() - start:.1f} s")
        return outputs

    @staticmethod
    def summary(outputs: SegmentationOutputs) -> str:
        """One status line: total time, where it ran, how many windows."""
        info = outputs.info
        return _("Done in {seconds:.0f} s ({device}, {precision}, {windows} windows).").format(
            seconds=sum(outputs.timings_s.values()),
            device=info.get("device", "?"),
            precision=info.get("precision", "?"),
            windows=info.get("windows", "?"),
        )

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _showAsProbability(volumeNode) -> None:
        """Window 0-1 and a rainbow colour table (when the scene has Slicer's default colours)."""
        displayNode = volumeNode.GetDisplayNode()
        if displayNode is None:
            return
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(0.0, 1.0)
        colorNodeId = "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"
        if volumeNode.GetScene().GetNodeByID(colorNodeId) is not None:
            displayNode.SetAndObserveColorNodeID(colorNodeId)


#
# AirwaySegmentationTest
#


class AirwaySegmentationTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer on a small synthetic chest CT (``AirwaySegmentationLib.phantom``)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AirwaySegmentation_phantom()
        self.setUp()
        self.test_AirwaySegmentation_background_and_cancel()

    def _phantomAndModel(self):
        """A small phantom in the scene and a model: the bundled default, else a random tiny WingsNet."""
        from AirwaySegmentationLib import mrml
        from AirwaySegmentationLib.phantom import generate_phantom

        AirwaySegmentationLogic().ensureDependencies(askConfirmation=False)
        phantom = generate_phantom(seed=1, shape_zyx=(48, 96, 96), spacing_zyx=(2.0, 1.5, 1.5))
        ctNode = mrml.node_from_volume(phantom.ct, slicer.mrmlScene, "AirwayPhantom")
        if AirwaySegmentationLogic.bundledModels():
            return phantom, ctNode, AirwaySegmentationLogic.resolveModel(), True
        return phantom, ctNode, self._tinyRandomModel(), False

    def _tinyRandomModel(self) -> str:
        import torch
        from AirwaySegmentationLib.models import export_model
        from AirwaySegmentationLib.networks import build_network
        from AirwaySegmentationLib.preprocess import DEFAULT_INPUT_SPEC

        torch.manual_seed(0)
        card = {
            "architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}},
            "input_spec": DEFAULT_INPUT_SPEC.as_dict(),
            "patch_size_zyx": [32, 32, 32],
        }
        folder = Path(tempfile.mkdtemp(prefix="AirwaySegmentationTest-"))
        weights, _card = export_model(build_network("wingsnet", base_width=2), card, folder / "tiny")
        return str(weights)

    def test_AirwaySegmentation_phantom(self):
        import numpy as np
        from AirwaySegmentationLib import mrml
        from AirwaySegmentationLib.classes import AIRWAY_CLASSES

        self.delayDisplay("Segmenting a synthetic chest CT")
        phantom, ctNode, model, trained = self._phantomAndModel()
        logic = AirwaySegmentationLogic()
        outputs = logic.process(ctNode, model=model, device="cpu", createProbability=True)

        segmentation = outputs.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(3)], [c.name for c in AIRWAY_CLASSES])
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))
        self.assertIsNotNone(outputs.probability)
        self.assertEqual(outputs.probability.GetImageData().GetDimensions(), ctNode.GetImageData().GetDimensions())

        labels = mrml.labels_from_segmentation_node(outputs.segmentation, phantom.ct)
        self.assertLessEqual(int(labels.array_zyx.max()), 3)
        if trained:
            # A trained model finds at least the trachea and main bronchi of the phantom.
            truth = phantom.airway.array_zyx > 0
            found = labels.array_zyx > 0
            dice = 2.0 * np.count_nonzero(truth & found) / max(1, np.count_nonzero(truth) + np.count_nonzero(found))
            self.assertGreater(dice, 0.5)

        # A second run into the same nodes replaces their content instead of adding nodes.
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        logic.process(ctNode, outputs.segmentation, model=model, device="cpu", createProbability=True,
                      probabilityVolume=outputs.probability, showResult=False)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), before)
        self.delayDisplay("Test passed")

    def test_AirwaySegmentation_background_and_cancel(self):
        self.delayDisplay("Segmenting in the background, then cancelling")
        _phantom, ctNode, model, _trained = self._phantomAndModel()
        logic = AirwaySegmentationLogic()
        request = logic.prepare(ctNode, model=model, device="cpu")

        task = BackgroundSegmentation(request)
        task.start()
        while not (status := task.poll()).finished:
            slicer.app.processEvents()  # the GUI stays responsive while the worker runs
            time.sleep(0.05)
        self.assertIsNone(status.error, status.traceback)
        outputs = logic.importResult(status.result, ctNode, showResult=False)
        self.assertEqual(outputs.segmentation.GetSegmentation().GetNumberOfSegments(), 3)

        task = BackgroundSegmentation(request)
        task.cancel()
        task.start()
        task.join()
        status = task.poll()
        self.assertTrue(status.finished and status.cancelled)
        self.assertIsNone(status.result)
        self.delayDisplay("Test passed")
