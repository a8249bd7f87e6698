"""AirwayRefine: reconnect a broken airway tree (stage 2), centerlines and training pairs, as a 3D Slicer module.

The file is thin on purpose, as AirwaySegmentation.py is: the Widget holds the GUI, the Logic
turns MRML nodes into arrays and back (``AirwaySegmentationLib.mrml``) and calls the headless
core (``AirwayRefineLib.refine``, ``.centerline``, ``.training_pairs``), which runs without
Slicer.  The dependency install, the device choice and the background worker are the
AirwaySegmentation module's, imported from it (this module depends on it).  Nothing from the
Libs is imported at module load: their packages may be installed only on the first Apply.
"""

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

from AirwaySegmentation import AirwaySegmentationLogic, BackgroundSegmentation, BackgroundTaskWidget, Device

#: Opacity of the breakage attention over the CT in the slice views.
ATTENTION_OPACITY = 0.4
#: Columns of the break table (one row per break record of the core).
BREAK_TABLE_COLUMNS = ("Break", "Gap (mm)", "Confidence", "Bridge", "Connected", "Pieces (voxels)")


#
# AirwayRefine
#


class AirwayRefine(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Airway Tree Refinement")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["AirwaySegmentation"]
        self.parent.contributors = ["Airway tree segmentation contributors (open source, Apache-2.0)"]
        self.parent.helpText = _("""
Reconnects the broken branches of an airway segmentation (stage 2) and exports its centerlines.
<ul>
<li>Pick the CT and its airway segmentation from Airway Tree Segmentation, run with "Keep all
components", and press Apply. The breakage attention (where two airway pieces come close) is
shown over the CT, a connection network predicts a bridge at each break, and the bridged tree
goes into a new segmentation: the input segmentation is kept as it was.</li>
<li>The table lists the breaks: click a row to move the slice views there; select rows and
press Connect selected to connect only those (or Connect all).</li>
<li>Export centerlines makes a curve per branch (lumen radius at every point), a centerline
model and, when a folder is given, the files centerlines.vtp, centerlines.mrk.json,
branches.csv and branches.json.</li>
<li>Add to training set saves the CT and the refined segmentation, after your corrections in
the Segment Editor, as a training case (imagesTr/NAME_0000.nii.gz, labelsTr/NAME.nii.gz) for
<code>airway train</code>.</li>
</ul>
The same computation runs without Slicer: <code>airway refine</code>, <code>airway centerline</code>.
See the <a href="https://github.com/airway-seg/SlicerAirwayTree#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Breakage attention and connection follow DeepTree's second stage; centerline curves with a radius
per point follow SlicerVMTK's Extract Centerline. The module structure follows Slicer's
scripted-module template.
""")


#
# AirwayRefineParameterNode
#


@parameterNodeWrapper
class AirwayRefineParameterNode:
    """The module's settings, saved with the scene.

    inputVolume - Chest CT in Hounsfield units.
    inputSegmentation - Stage-1 airway segmentation with all its components; never modified.
    modelFile - Connection model file (NAME.safetensors); empty: the bundled default.
    device - Where the network runs.
    outputSegmentation - Receives the refined airway (created when empty); centerlines and
        training pairs are made from it.
    attentionVolume - Receives the breakage attention (created when empty).
    showAttention - Show the attention over the CT in the slice views.
    centerlinesFolder - Folder for the centerline files; empty: nodes only.
    datasetFolder - Dataset folder that receives training pairs.
    trainingCaseName - Case name of the training pair; empty: the CT's name.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    modelFile: str = ""
    device: Device = Device.AUTO
    outputSegmentation: vtkMRMLSegmentationNode
    attentionVolume: vtkMRMLScalarVolumeNode
    showAttention: bool = True
    centerlinesFolder: str = ""
    datasetFolder: str = ""
    trainingCaseName: str = ""


#
# AirwayRefineWidget
#


class AirwayRefineWidget(BackgroundTaskWidget):
    """GUI: node selectors, Apply/Cancel, the break table and the export buttons; the work is the Logic's."""

    FAILURE_MESSAGE = "AirwayRefine failed: {error}"

    def __init__(self, parent=None) -> None:
        BackgroundTaskWidget.__init__(self, parent)
        self._refinement: Optional[Refinement] = None

    def setup(self) -> None:
        self._setupTaskUi("UI/AirwayRefine.ui", AirwayRefineLogic())
        self.ui.breaksTableWidget.setColumnCount(len(BREAK_TABLE_COLUMNS))
        self.ui.breaksTableWidget.setHorizontalHeaderLabels(list(BREAK_TABLE_COLUMNS))
        for pathLineEdit in (self.ui.modelPathLineEdit, self.ui.centerlinesFolderLineEdit, self.ui.datasetFolderLineEdit):
            pathLineEdit.connect("currentPathChanged(QString)", self._onPathChanged)
        self.ui.breaksTableWidget.connect("cellClicked(int,int)", self.onBreakClicked)
        self.ui.breaksTableWidget.connect("itemSelectionChanged()", self._updateGui)
        self.ui.connectAllButton.connect("clicked(bool)", self.onConnectAll)
        self.ui.connectSelectedButton.connect("clicked(bool)", self.onConnectSelected)
        self.ui.exportCenterlinesButton.connect("clicked(bool)", self.onExportCenterlines)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSet)
        self.initializeParameterNode()

    def onReload(self) -> None:
        self._reloadPackages(("AirwayRefineLib", "AirwaySegmentationLib"))

    def onSceneStartClose(self, caller, event) -> None:
        # The nodes are about to disappear: a running result has nowhere to go, the breaks no tree.
        self._stopTask(wait=False)
        self._showRefinement(None)
        self.setParameterNode(None)

    def initializeParameterNode(self) -> None:
        BackgroundTaskWidget.initializeParameterNode(self)
        if not self._parameterNode.inputSegmentation:
            firstSegmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if firstSegmentationNode:
                self._parameterNode.inputSegmentation = firstSegmentationNode

    def _pathLineEdits(self) -> dict:
        return {
            "modelFile": self.ui.modelPathLineEdit,
            "centerlinesFolder": self.ui.centerlinesFolderLineEdit,
            "datasetFolder": self.ui.datasetFolderLineEdit,
        }

    def _showParametersInGui(self) -> None:
        for name, lineEdit in self._pathLineEdits().items():
            wasBlocked = lineEdit.blockSignals(True)
            lineEdit.currentPath = getattr(self._parameterNode, name)
            lineEdit.blockSignals(wasBlocked)

    def _onPathChanged(self, *args) -> None:
        if not self._parameterNode:
            return
        with slicer.util.NodeModify(self._parameterNode):
            for name, lineEdit in self._pathLineEdits().items():
                setattr(self._parameterNode, name, lineEdit.currentPath)

    # --- state -----------------------------------------------------------------------------

    def _updateGui(self, caller=None, event=None) -> None:
        running = self._task is not None
        for widget in (
            self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton, self.ui.advancedCollapsibleButton,
            self.ui.breaksCollapsibleButton, self.ui.centerlinesCollapsibleButton, self.ui.trainingCollapsibleButton,
        ):
            widget.enabled = not running
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the work (after the current step)")
            self.ui.applyButton.enabled = not self._task.cancelRequested
            return
        parameters = self._parameterNode
        self.ui.applyButton.text = _("Apply")
        problems = []
        if not (parameters and parameters.inputVolume):
            problems.append(_("Select the input CT volume."))
        if not (parameters and parameters.inputSegmentation):
            problems.append(_("Select the airway segmentation to refine."))
        elif parameters.outputSegmentation is parameters.inputSegmentation:
            problems.append(_("Choose another refined segmentation: the input keeps the result before refinement."))
        if parameters and parameters.attentionVolume and parameters.attentionVolume is parameters.inputVolume:
            problems.append(_("Choose another attention volume: the CT cannot receive the attention."))
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = "\n".join(problems) or _("Find the breaks and connect them")

        self.ui.connectAllButton.enabled = self._refinement is not None
        self.ui.connectSelectedButton.enabled = self._refinement is not None and bool(self._selectedBreakIds())
        canExport = bool(parameters and parameters.inputVolume and parameters.outputSegmentation)
        self.ui.exportCenterlinesButton.enabled = canExport
        self.ui.addToTrainingSetButton.enabled = canExport and bool(parameters.datasetFolder)

    def onApply(self) -> None:
        parameters = self._parameterNode
        self.ui.statusLabel.text = _("Checking the Python packages...")
        slicer.app.processEvents()
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to start the refinement."), waitCursor=True):
                self.logic.ensureDependencies()
                self.ui.statusLabel.text = _("Reading the CT and the segmentation...")
                request = self.logic.prepare(
                    parameters.inputVolume, parameters.inputSegmentation, model=parameters.modelFile or None,
                    device=parameters.device.value,
                )
                self._startTask(request, AirwayRefineLogic.run, self._importRefinement)
        finally:
            if self._task is None:
                self.ui.statusLabel.text = _("Not started.")
            self._updateGui()

    # --- refinement and breaks ----------------------------------------------------------------

    def _importRefinement(self, result, request) -> None:
        parameters = self._parameterNode
        refinement = self.logic.importResult(
            result, request, parameters.inputVolume, parameters.inputSegmentation,
            outputSegmentation=parameters.outputSegmentation, attentionVolume=parameters.attentionVolume,
            showAttention=parameters.showAttention,
        )
        with slicer.util.NodeModify(parameters):
            parameters.outputSegmentation = refinement.segmentation
            parameters.attentionVolume = refinement.attention
        # The stage-1 segmentation stays in the scene, hidden under the refined one.
        if parameters.inputSegmentation.GetDisplayNode() is not None:
            parameters.inputSegmentation.GetDisplayNode().SetVisibility(False)
        slicer.util.setSliceViewerLayers(background=parameters.inputVolume, fit=False)
        self._showRefinement(refinement)

    def _showRefinement(self, refinement: Optional["Refinement"]) -> None:
        """Fill the break table (and the status line) from a refinement, or empty it."""
        self._refinement = refinement
        table = self.ui.breaksTableWidget
        wasBlocked = table.blockSignals(True)
        breaks = refinement.breaks if refinement is not None else []  # built once: each call builds every record
        rows = breakTableRows(breaks)
        table.setRowCount(len(rows))
        for row, values in enumerate(rows):
            for column, text in enumerate(values):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                if breaks[row].get("rejected"):  # why the widening guard refused (part of) its bridge
                    item.setToolTip(breaks[row]["rejected"])
                table.setItem(row, column, item)
        table.blockSignals(wasBlocked)
        if refinement is not None:
            self.ui.statusLabel.text = AirwayRefineLogic.summary(refinement)
        self._updateGui()

    def _selectedBreakIds(self) -> list:
        if self._refinement is None:
            return []
        rows = sorted({index.row() for index in self.ui.breaksTableWidget.selectionModel().selectedRows()})
        return [self._refinement.breaks[row]["id"] for row in rows]

    def onBreakClicked(self, row: int, column: int) -> None:
        if self._refinement is not None:
            AirwayRefineLogic.jumpToBreak(self._refinement.breaks[row], slicer.mrmlScene)

    def onConnectAll(self) -> None:
        self._connect("all")

    def onConnectSelected(self) -> None:
        self._connect(self._selectedBreakIds())

    def _connect(self, breakIds) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to connect the breaks."), waitCursor=True):
            self._showRefinement(self.logic.connectBreaks(self._refinement, breakIds))

    # --- centerlines and training pairs -----------------------------------------------------------

    def onExportCenterlines(self) -> None:
        parameters = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to start the centerline extraction."), waitCursor=True):
                self.logic.ensureDependencies()
                request = self.logic.prepareCenterlines(
                    parameters.outputSegmentation, parameters.inputVolume, parameters.centerlinesFolder
                )
                self._startTask(request, AirwayRefineLogic.runCenterlines, self._importCenterlines,
                                commits=bool(request.outputFolder))
        finally:
            self._updateGui()

    def _importCenterlines(self, result, request) -> None:
        outputs = self.logic.importCenterlines(result, request, slicer.mrmlScene)
        self.ui.statusLabel.text = AirwayRefineLogic.centerlineSummary(outputs)

    def onAddToTrainingSet(self) -> None:
        parameters = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to add the training pair."), waitCursor=True):
                self.logic.ensureDependencies()
                request = self.logic.prepareTrainingPair(
                    parameters.inputVolume, parameters.outputSegmentation, parameters.datasetFolder,
                    parameters.trainingCaseName,
                )
                if request.existing:
                    request.overwrite = slicer.util.confirmYesNoDisplay(
                        _("The dataset already has a case {name}; replace it?").format(name=request.name),
                        detailedText="\n".join(str(path) for path in request.existing),
                    )
                if request.overwrite or not request.existing:
                    self._startTask(request, AirwayRefineLogic.runTrainingPair, self._showTrainingPair, commits=True)
        finally:
            self._updateGui()

    def _showTrainingPair(self, paths, request) -> None:
        self.ui.statusLabel.text = _("Training case {name} added: {image}, {label}").format(
            name=request.name, image=paths[0], label=paths[1]
        )


def breakTableRows(breaks: list) -> list:
    """Text of the break table, one row per break record (``RefineResult.breaks_document()["breaks"]``)."""
    rows = []
    for record in breaks:
        gap = record["gap_mm"]
        rows.append([
            str(record["id"]),
            "-" if gap is None else f"{gap:.1f}",  # None: the pieces lie beyond the patch
            f"{record['confidence']:.2f}",
            _("yes") if record["connected"] else (_("refused") if record.get("rejected") else _("no")),
            _("yes") if record["merged"] else _("no"),
            " / ".join(str(voxels) for voxels in record["component_voxels"]),
        ])
    return rows


#
# AirwayRefineLogic
#


@dataclass
class RefineRequest:
    """Everything the worker needs for stage 2, with no MRML in it (built by :meth:`AirwayRefineLogic.prepare`)."""

    ct: Any  # AirwaySegmentationLib.volume.Volume (HU, LPS geometry)
    stage1: Any  # Volume: the stage-1 labels on the CT's grid
    ctName: str
    model: Any  # AirwaySegmentationLib.segment.SegmentationModel (the connection network)
    settings: Any  # AirwaySegmentationLib.inference_settings.InferenceSettings


@dataclass
class Refinement:
    """A refinement in the scene, which :meth:`AirwayRefineLogic.connectBreaks` can connect differently.

    ``result`` is the core's ``RefineResult``: its breaks and bridges were predicted once;
    its labels and ``merged_ids`` follow the last choice of breaks.
    """

    stage1: Any  # Volume: the labels the breaks were found in (the input segmentation, unchanged)
    result: Any  # AirwayRefineLib.refine.RefineResult
    inputVolume: Any  # vtkMRMLScalarVolumeNode
    segmentation: Any  # vtkMRMLSegmentationNode with the refined labels
    attention: Any  # vtkMRMLScalarVolumeNode with the breakage attention

    @property
    def breaks(self) -> list:
        """One record per break (id, position_lps_mm, gap_mm, confidence, connected, merged, ...)."""
        return self.result.breaks_document()["breaks"]


@dataclass
class CenterlineRequest:
    """Everything the centerline worker needs (built by :meth:`AirwayRefineLogic.prepareCenterlines`)."""

    labels: Any  # Volume: the airway labels on the CT's grid
    name: str  # the segmentation's name, for the nodes
    outputFolder: str = ""  # where the files go; empty: none


@dataclass
class CenterlineOutputs:
    """The nodes and files of one centerline export."""

    tree: Any  # AirwayRefineLib.centerline.CenterlineTree
    curves: list  # vtkMRMLMarkupsCurveNode, one per branch, in the tree's order
    model: Any  # vtkMRMLModelNode
    folderItemId: int  # subject hierarchy folder holding the curves and the model
    files: list = field(default_factory=list)


@dataclass
class TrainingPairRequest:
    """A training pair to write (built by :meth:`AirwayRefineLogic.prepareTrainingPair`)."""

    datasetFolder: Path
    name: str
    ct: Any  # Volume
    labels: Any  # Volume
    existing: list  # files of a case of that name already in the dataset
    overwrite: bool = False


class AirwayRefineLogic(ScriptedLoadableModuleLogic):
    """Refine an airway segmentation node, export its centerlines, add it to a training set.

    Example (Slicer's Python console)::

        logic = slicer.util.getModuleLogic("AirwayRefine")
        logic.ensureDependencies()
        refinement = logic.process(getNode("CT"), getNode("CT airway"))
        [b["id"] for b in refinement.breaks if b["connected"]]  # breaks with a predicted bridge
        refinement = logic.connectBreaks(refinement, [1, 3])     # connect only these
        logic.exportCenterlines(refinement.segmentation, getNode("CT"), "/tmp/centerlines")
        logic.addToTrainingSet(getNode("CT"), refinement.segmentation, "/data/airways", "patient7")

    Each job is a main-thread ``prepare*`` (nodes -> arrays), an any-thread ``run*`` (the
    headless core) and a main-thread ``import*`` (arrays -> nodes); the Widget runs the
    middle step in a ``BackgroundSegmentation`` worker.  Only :meth:`ensureDependencies` and
    :meth:`getParameterNode` need the Slicer application; the rest works on the scene of the
    nodes it is given.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return AirwayRefineParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies(askConfirmation: bool = True) -> None:
        """Install what the cores need, after asking: the same packages as AirwaySegmentation."""
        AirwaySegmentationLogic().ensureDependencies(askConfirmation)

    # --- stage 2 -------------------------------------------------------------------------------

    def prepare(self, inputVolume, inputSegmentation, model=None, device: str = "auto") -> RefineRequest:
        """Main thread: read the CT and its stage-1 segmentation, load the connection network.

        ``model`` is a model file, a bundled name, a loaded ``SegmentationModel`` or None
        (the bundled default connection model).
        """
        from AirwayRefineLib.connect import load_connection_model
        from AirwaySegmentationLib import mrml
        from AirwaySegmentationLib.infer import resolve_device
        from AirwaySegmentationLib.inference_settings import InferenceSettings
        from AirwaySegmentationLib.segment import SegmentationModel

        if inputVolume is None:
            raise ValueError("Select the input CT volume.")
        if inputSegmentation is None:
            raise ValueError("Select the airway segmentation to refine.")
        settings = InferenceSettings(device=str(device))
        resolve_device(settings.device)  # a missing GPU is reported now, not after the attention
        ct = mrml.volume_from_node(inputVolume)
        return RefineRequest(
            ct=ct,
            stage1=mrml.labels_from_segmentation_node(inputSegmentation, ct),
            ctName=inputVolume.GetName(),
            model=model if isinstance(model, SegmentationModel) else load_connection_model(model),
            settings=settings,
        )

    @staticmethod
    def run(request: RefineRequest, progress=None, cancel=None):
        """Any thread: breakage attention, bridges and the merge of every bridged break; a ``RefineResult``."""
        from AirwayRefineLib.refine import refine_ct

        return refine_ct(request.ct, request.stage1, request.model, request.settings, connect="all",
                         progress=progress, cancel=cancel)

    def importResult(
        self,
        result,
        request: RefineRequest,
        inputVolume,
        inputSegmentation,
        outputSegmentation=None,
        attentionVolume=None,
        showAttention: bool = True,
        showResult: bool = True,
    ) -> Refinement:
        """Main thread: the refined labels and the attention into nodes; the stage-1 segmentation is left as it is.

        ``outputSegmentation`` and ``attentionVolume`` (if given) are filled, else new nodes
        are added; neither may be an input node.  ``showAttention`` overlays the attention
        on the CT in every slice view (Inferno colours, :data:`ATTENTION_OPACITY`);
        ``showResult`` adds the closed-surface representation for the 3-D view.
        """
        from AirwaySegmentationLib import mrml

        scene = inputVolume.GetScene()
        if scene is None:
            raise ValueError(f"The CT {inputVolume.GetName()!r} was removed from the scene; load it and run again.")
        if outputSegmentation is not None and outputSegmentation is inputSegmentation:
            raise ValueError("Choose another output segmentation: the input segmentation keeps the result before refinement.")
        if attentionVolume is not None and attentionVolume is inputVolume:
            raise ValueError("Choose another attention volume: the CT cannot receive the attention.")
        segmentation = mrml.segmentation_node_from_labels(
            result.labels, scene, f"{request.ctName} airway refined", reference_node=inputVolume, node=outputSegmentation
        )
        if showResult:
            segmentation.CreateClosedSurfaceRepresentation()
        attentionName = attentionVolume.GetName() if attentionVolume is not None else f"{request.ctName} breakage attention"
        attention = mrml.node_from_volume(result.attention, scene, attentionName, node=attentionVolume)
        if showAttention:
            mrml.show_as_overlay(attention, opacity=ATTENTION_OPACITY)
        return Refinement(request.stage1, result, inputVolume, segmentation, attention)

    def connectBreaks(self, refinement: Refinement, breakIds="all", showResult: bool = True) -> Refinement:
        """Connect all bridged breaks (``"all"``), none (``[]``) or the given ids, without predicting again.

        The refined segmentation node is filled anew from the stage-1 labels and the chosen
        bridges (edits made in it are replaced); the stage-1 segmentation stays as it was.
        A break without a bridge is refused (``AirwayInputError``).
        """
        from AirwayRefineLib.refine import merge_selected
        from AirwaySegmentationLib import mrml

        segmentation = refinement.segmentation
        if segmentation.GetScene() is None:
            raise ValueError(f"The refined segmentation {segmentation.GetName()!r} was deleted; run the refinement again.")
        labels, mergedIds, componentsAfter = merge_selected(refinement.stage1, refinement.result.prediction, breakIds)
        mrml.segmentation_node_from_labels(
            labels, segmentation.GetScene(), segmentation.GetName(), reference_node=refinement.inputVolume, node=segmentation
        )
        if showResult:
            segmentation.CreateClosedSurfaceRepresentation()
        result = replace(refinement.result, labels=labels, merged_ids=mergedIds, components_after=componentsAfter)
        return replace(refinement, result=result)

    def process(
        self,
        inputVolume,
        inputSegmentation,
        outputSegmentation=None,
        model=None,
        device: str = "auto",
        attentionVolume=None,
        showAttention: bool = True,
        showResult: bool = True,
        progress=None,
        cancel=None,
    ) -> Refinement:
        """Refine the airway segmentation of a CT and wait for it (scripts, tests).

        Parameters
        ----------
        inputVolume : vtkMRMLScalarVolumeNode
            Chest CT in Hounsfield units.
        inputSegmentation : vtkMRMLSegmentationNode
            Its stage-1 airway segmentation with all components; not modified.
        outputSegmentation : vtkMRMLSegmentationNode, optional
            Receives the refined airway (None: a new node).
        model : str or SegmentationModel, optional
            Connection model file, bundled name or loaded model; None: the bundled default.
        device : {"auto", "cpu", "cuda"}
        attentionVolume : vtkMRMLScalarVolumeNode, optional
            Receives the breakage attention (None: a new node).
        showAttention, showResult : bool
            Overlay the attention on the slice views; add the closed surface (3-D display).
        progress, cancel
            ``progress(fraction, message)`` and an object with ``is_set()``, as the core takes them.

        Returns
        -------
        Refinement
        """
        start = time.perf_counter()
        request = self.prepare(inputVolume, inputSegmentation, model, device)
        result = self.run(request, progress=progress, cancel=cancel)
        refinement = self.importResult(result, request, inputVolume, inputSegmentation, outputSegmentation,
                                       attentionVolume, showAttention, showResult)
        logging.info(f"Airway refinement done in {time.perf_counter() - start:.1f} s")
        return refinement

    @staticmethod
    def summary(refinement: Refinement) -> str:
        """One status line: breaks found, bridged and connected; airway pieces before and after."""
        document = refinement.result.breaks_document()
        return _("{found} breaks found, {bridged} bridged, {merged} connected; {before} airway pieces, "
                 "{after} after connecting (the largest is kept).").format(
            found=document["found"], bridged=document["bridged"], merged=len(document["merged"]),
            before=document["components_before"], after=document["components_after_merge"],
        )

    @staticmethod
    def jumpToBreak(record: dict, scene) -> None:
        """Centre the slice views of ``scene`` on a break (its record's ``position_lps_mm``)."""
        from AirwaySegmentationLib import mrml

        mrml.jump_slices_to(scene, record["position_lps_mm"])

    # --- centerlines --------------------------------------------------------------------------

    def prepareCenterlines(self, segmentationNode, referenceVolume, outputFolder: str = "") -> CenterlineRequest:
        """Main thread: the segmentation's airway labels on the CT's grid (its current content, edits included)."""
        from AirwaySegmentationLib import mrml

        if segmentationNode is None or referenceVolume is None:
            raise ValueError("Select the CT and the refined segmentation first (or run the refinement).")
        labels = mrml.labels_from_segmentation_node(segmentationNode, mrml.volume_from_node(referenceVolume))
        if not labels.array_zyx.any():
            raise ValueError(f"The segmentation {segmentationNode.GetName()!r} holds no airway; there are no centerlines.")
        return CenterlineRequest(labels, segmentationNode.GetName(), str(outputFolder or ""))

    @staticmethod
    def runCenterlines(request: CenterlineRequest, progress=None, cancel=None) -> tuple:
        """Any thread: the centerline tree of the labels, and its files when a folder is given; ``(tree, paths)``."""
        from AirwayRefineLib.centerline import extract_centerlines, write_centerlines
        from AirwaySegmentationLib.classes import as_class_map
        from AirwaySegmentationLib.progress import report, sub_progress

        labels = request.labels.array_zyx
        tree = extract_centerlines(labels > 0, request.labels.geometry, labels_zyx=as_class_map(labels),
                                   progress=sub_progress(progress, 0.0, 0.9))
        paths = []
        if request.outputFolder:
            report(progress, 0.9, f"Writing {len(tree.branches)} branches to {request.outputFolder}")
            paths = write_centerlines(tree, request.outputFolder)
        report(progress, 1.0, f"{len(tree.branches)} centerline branches")
        return tree, paths

    def importCenterlines(self, result: tuple, request: CenterlineRequest, scene) -> CenterlineOutputs:
        """Main thread: one curve per branch (radius per point, class colour) and a centerline model, in a folder.

        The folder is named after the segmentation; a folder of that name from an earlier
        export is replaced with its nodes.
        """
        from AirwaySegmentationLib import mrml
        from AirwaySegmentationLib.classes import AIRWAY_CLASSES

        tree, paths = result
        colours = {airway_class.label: airway_class.color_rgb for airway_class in AIRWAY_CLASSES}
        centerlines = [(b.name, b.points_xyz, b.radius_mm) for b in tree.branches]
        curves = mrml.curve_nodes_from_centerlines(centerlines, scene)
        for branch, curve in zip(tree.branches, curves):
            curve.SetLocked(True)
            display = curve.GetDisplayNode()
            display.SetSelectedColor(*colours[branch.airway_class])
            display.SetPointLabelsVisibility(False)
            display.SetPropertiesLabelVisibility(False)
        model = mrml.centerline_model_node(centerlines, scene, f"{request.name} centerline model", {
            "BranchId": [b.id for b in tree.branches],
            "ParentId": [-1 if b.parent is None else b.parent for b in tree.branches],
            "Generation": [b.generation for b in tree.branches],
            "Class": [b.airway_class for b in tree.branches],
        })
        hierarchy = scene.GetSubjectHierarchyNode()
        folderName = f"{request.name} centerlines"
        earlier = hierarchy.GetItemChildWithName(hierarchy.GetSceneItemID(), folderName)
        if earlier:
            hierarchy.RemoveItem(earlier, True, True)
        folder = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), folderName)
        for node in (model, *curves):
            hierarchy.CreateItem(folder, node)
        return CenterlineOutputs(tree, curves, model, folder, list(paths))

    def exportCenterlines(self, segmentationNode, referenceVolume, outputFolder: str = "", progress=None,
                          cancel=None) -> CenterlineOutputs:
        """Centerlines of a segmentation as curves, a model and (given a folder) files; waits for it (scripts, tests)."""
        request = self.prepareCenterlines(segmentationNode, referenceVolume, outputFolder)
        result = self.runCenterlines(request, progress=progress, cancel=cancel)
        return self.importCenterlines(result, request, segmentationNode.GetScene())

    @staticmethod
    def centerlineSummary(outputs: CenterlineOutputs) -> str:
        """One status line: branches, and where the files went."""
        text = _("{count} centerline branches.").format(count=len(outputs.tree.branches))
        if outputs.files:
            text += " " + _("Files in {folder}.").format(folder=Path(outputs.files[0]).parent)
        return text

    # --- training pairs -------------------------------------------------------------------------

    def prepareTrainingPair(self, inputVolume, segmentationNode, datasetFolder, caseName: str = "") -> TrainingPairRequest:
        """Main thread: the CT and the segmentation's current labels, the case name (from ``caseName`` or
        the CT's name, made valid) and the files of a case of that name already in the dataset."""
        from AirwayRefineLib.training_pairs import (
            existing_case_files,
            training_case_name,
        )
        from AirwaySegmentationLib import mrml

        if inputVolume is None or segmentationNode is None:
            raise ValueError("Select the CT and the refined segmentation first (or run the refinement).")
        if not datasetFolder:
            raise ValueError("Choose the dataset folder that receives the training pair.")
        name = training_case_name(caseName or inputVolume.GetName())
        ct = mrml.volume_from_node(inputVolume)
        labels = mrml.labels_from_segmentation_node(segmentationNode, ct, refuse_others=True)
        return TrainingPairRequest(Path(datasetFolder), name, ct, labels, existing_case_files(datasetFolder, name))

    @staticmethod
    def runTrainingPair(request: TrainingPairRequest, progress=None, cancel=None) -> tuple:
        """Any thread: write the pair (``imagesTr/NAME_0000.nii.gz``, ``labelsTr/NAME.nii.gz``); returns both paths."""
        from AirwayRefineLib.training_pairs import add_training_pair
        from AirwaySegmentationLib.progress import report

        report(progress, 0.0, f"Writing case {request.name}")
        paths = add_training_pair(request.datasetFolder, request.name, request.ct, request.labels,
                                  overwrite=request.overwrite)
        report(progress, 1.0, f"Case {request.name} added")
        return paths

    def addToTrainingSet(self, inputVolume, segmentationNode, datasetFolder, caseName: str = "",
                         overwrite: bool = False) -> tuple:
        """Save the CT and the segmentation (as corrected) as a training pair; returns (image path, label path).

        A case of that name is replaced only with ``overwrite`` (else ``AirwayInputError``).
        """
        request = self.prepareTrainingPair(inputVolume, segmentationNode, datasetFolder, caseName)
        request.overwrite = overwrite
        return self.runTrainingPair(request)


#
# AirwayRefineTest
#


class AirwayRefineTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer on a small synthetic chest CT with simulated breaks."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AirwayRefine_phantom()

    @staticmethod
    def lumenOracle():
        """A known connection network (the core's lumen oracle), so that the test needs no trained model."""
        from AirwayRefineLib.connect_training import lumen_oracle

        return lumen_oracle()

    def test_AirwayRefine_phantom(self):
        import numpy as np
        from AirwayRefineLib.breakage import simulate_breakage
        from AirwaySegmentationLib import mrml
        from AirwaySegmentationLib.data import find_cases
        from AirwaySegmentationLib.phantom import generate_phantom

        self.delayDisplay("Refining a synthetic chest CT with simulated breaks")
        AirwayRefineLogic.ensureDependencies(askConfirmation=False)
        phantom = generate_phantom(seed=1, shape_zyx=(64, 96, 96), spacing_zyx=(2.0, 1.5, 1.5))
        broken = simulate_breakage(phantom.airway3.array_zyx, phantom.ct.spacing_zyx, np.random.default_rng(0))
        ctNode = mrml.node_from_volume(phantom.ct, slicer.mrmlScene, "AirwayPhantom")
        stage1 = phantom.airway3.with_array(broken.broken_zyx)
        stage1Node = mrml.segmentation_node_from_labels(stage1, slicer.mrmlScene, "AirwayPhantom airway", ctNode)
        logic = AirwayRefineLogic()

        # In the background, as the GUI runs it; then into the scene.
        request = logic.prepare(ctNode, stage1Node, model=self.lumenOracle(), device="cpu")
        task = BackgroundSegmentation(request, AirwayRefineLogic.run)
        task.start()
        while not (status := task.poll()).finished:
            slicer.app.processEvents()  # the GUI stays responsive while the worker runs
            time.sleep(0.05)
        self.assertIsNone(status.error, status.traceback)
        refinement = logic.importResult(status.result, request, ctNode, stage1Node, showResult=False)

        self.assertIsNot(refinement.segmentation, stage1Node)
        self.assertGreater(len(refinement.breaks), 0)
        self.assertEqual(refinement.attention.GetImageData().GetDimensions(), ctNode.GetImageData().GetDimensions())
        bridged = [record["id"] for record in refinement.breaks if record["connected"]]
        self.assertTrue(bridged, "the oracle bridges at least one simulated break")
        self.assertEqual(len(breakTableRows(refinement.breaks)), len(refinement.breaks))
        AirwayRefineLogic.jumpToBreak(refinement.breaks[0], slicer.mrmlScene)

        # Connect one break only, then none: the refined node changes, the stage-1 node never.
        one = logic.connectBreaks(refinement, bridged[:1], showResult=False)
        self.assertEqual(one.result.merged_ids, bridged[:1])
        none = logic.connectBreaks(one, [], showResult=False)
        self.assertEqual(none.result.merged_ids, [])
        allBreaks = logic.connectBreaks(none, "all", showResult=False)
        self.assertEqual(allBreaks.result.merged_ids, bridged)
        refined = mrml.labels_from_segmentation_node(allBreaks.segmentation, phantom.ct).array_zyx
        self.assertTrue(np.array_equal(refined, allBreaks.result.labels.array_zyx))
        self.assertTrue(np.array_equal(mrml.labels_from_segmentation_node(stage1Node, phantom.ct).array_zyx, stage1.array_zyx))

        self.delayDisplay("Centerlines and a training pair")
        folder = Path(tempfile.mkdtemp(prefix="AirwayRefineTest-"))
        centerlines = logic.exportCenterlines(allBreaks.segmentation, ctNode, str(folder / "centerlines"))
        self.assertEqual(len(centerlines.curves), len(centerlines.tree.branches))
        self.assertTrue(all(path.is_file() for path in centerlines.files))
        imagePath, labelPath = logic.addToTrainingSet(ctNode, allBreaks.segmentation, folder / "dataset")
        self.assertEqual([(c.name, c.image_path, c.label_path) for c in find_cases(folder / "dataset")],
                         [("AirwayPhantom", imagePath, labelPath)])
        self.delayDisplay("Test passed")
