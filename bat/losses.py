"""Training losses of the heads (bat.heads), as REF: cross-entropy or asymmetric BCE for clips, CTC for speech."""
import torch
import torch.nn.functional as F


def asymmetric_loss(logits, targets, gamma_neg=1.0, gamma_pos=0.0, eps=1e-8):
    """REF's AsymmetricLossMultiLabel(gamma_neg=1, gamma_pos=0, clip=0): BCE whose terms are weighted by
    (1 - p_t)^gamma, the weight computed without gradient; negatives are thus weighted by their own
    predicted probability. Mean over all entries."""
    p = logits.sigmoid()
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log((1 - p).clamp(min=eps))
    with torch.no_grad():
        pt = p * targets + (1 - p) * (1 - targets)
        w = torch.pow(1 - pt, gamma_pos * targets + gamma_neg * (1 - targets))
    return -(loss * w).mean()


def classification_loss(logits, targets, task, asymmetric=True):
    """Cross-entropy for single-label data, asymmetric BCE for multi-label (as REF); asymmetric=False:
    plain BCE (REF's BirdSet HSN recipe)."""
    logits = logits.float()
    if task == "multiclass":
        return F.cross_entropy(logits, targets)
    if not asymmetric:
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    return asymmetric_loss(logits, targets.float())


def ctc_loss(log_probs, targets, input_lengths, target_lengths):
    """REF's torch.nn.CTCLoss(blank=0, zero_infinity=True): mean over the batch of each utterance's loss
    divided by its target length. log_probs (B, T, C) as bat.heads.ASRHead returns them."""
    return F.ctc_loss(log_probs.transpose(0, 1), targets, input_lengths, target_lengths, blank=0,
                      reduction="mean", zero_infinity=True)
