"""Build and audit face-image classifiers of sociodemographic categories: preprocessing, CNN grids, a disaggregated self-audit with uncertainty, interpretation, a confounding probe and model cards.

Modules:

- `mugshotrace.agreement`: How much raters agree with each other (Fleiss' kappa, Krippendorff's alpha) and how much label sources agree (Cohen's kappa, confusion matrices), overall and per subgroup — and what those numbers should be under a known noise model.
- `mugshotrace.confounding`: xGEMs (manifold-constrained counterfactuals): an autoencoder of the image manifold, a latent search that pushes a black box across its decision boundary, an attribute oracle recalibrated to equalized odds with respect to the target label, and the confounding metric with stratified bootstrap intervals.
- `mugshotrace.confounding_probe`: The xGEMs probe end to end: black boxes, the oracle with its Table 6.1, the probe of one black box (Tables 6.2, 6.3), the seed's confounded-vs-unconfounded experiment, figures of counterfactual paths, and `mugshotrace confound RUN_DIR`.
- `mugshotrace.faces_align`: OpenFace (AlignDlib, v1) alignment: dlib HOG detection with one upsample, the largest face, 68 landmarks and an exact 3-point affine onto OpenFace's mean template.
- `mugshotrace.faces_mtcnn`: facenet-pytorch MTCNN in equal-size batches (on the GPU when there is one): the largest face, its probability and five landmarks, and the crop with a margin resized to size × size.
- `mugshotrace.interp`: Grad-CAM, guided backprop and guided Grad-CAM through captum for every registered architecture (batched, float32, eval mode, maps at input resolution), the best/worst images of every scenario, privacy-safe figures, and the `mugshotrace explain` subcommand.
- `mugshotrace.interp_regions`: Facial-region attribution from 68-point landmarks (forehead, eyes, nose, cheeks, mouth, chin, hair/background), group-mean maps on aligned faces, between-group differences with bootstrap intervals, and a deletion/insertion faithfulness check against a random-order baseline.
- `mugshotrace.labeling`: Bulk labels from a shareable model bundle: streaming, resumable, one row per input image, with optional test-time augmentation, temperature scaling, agreement with existing labels and the coverage gain.
- `mugshotrace.landmarks`: dlib face detection and 68-point landmarks, loaded once per process, plus the OpenFace template and the facial-region index sets that alignment, the synthetic benchmark and interpretation share.
- `mugshotrace.model_cards`: Model cards (Mitchell et al. 2019) in the Model Card Toolkit's JSON layout, as Markdown and HTML, from a run folder and the audit table; and a datasheet skeleton (Gebru et al. 2018) for the study's data.
- `mugshotrace.models`: The architecture registry (the seed's seven CNNs plus small CPU ones), `face_learner`, and model bundles (safetensors + JSON, no pickle on the sharing path).
- `mugshotrace.report`: One self-contained HTML report per study: runs, disaggregated metrics with intervals, the seed's top/bottom scenarios, between-group tests, confounding results, the stages' figures under privacy defaults, and links to the model cards.
- `mugshotrace.runner`: One run, start to finish, in its own folder: lock, heartbeat, state, training recipe, predictions, metrics, model bundle and environment — safe to kill at any moment and to start again."""

__version__ = "0.1.0"
