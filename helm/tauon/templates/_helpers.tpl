{{/* Chart name, truncated to 63 characters (DNS label). */}}
{{- define "tauon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "tauon.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tauon.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tauon.labels" -}}
helm.sh/chart: {{ include "tauon.chart" . }}
{{ include "tauon.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tauon
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the operator pod. */}}
{{- define "tauon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tauon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tauon.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tauon.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tauon.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "tauon.defaultTrainerImage" -}}
{{- default (printf "ghcr.io/tauon-dev/trainer:%s" .Chart.AppVersion) .Values.operator.defaultImage }}
{{- end }}

{{/*
The namespaces the operator watches, as a JSON list: watchNamespaces, or the release namespace with
rbac.scope=namespace, or [] (all namespaces).
*/}}
{{- define "tauon.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else if eq .Values.rbac.scope "namespace" }}
{{- list .Release.Namespace | toJson }}
{{- else }}
{{- list | toJson }}
{{- end }}
{{- end }}

{{/*
The operator's namespaced permissions, derived from the code (operator/tauon/kube/client.py and
handlers/): Kopf lists and watches the watched kinds, and the operator writes only what it owns.
No wildcards; status only through /status.
*/}}
{{- define "tauon.namespacedRules" -}}
# FineTuneJob/InferenceService/FineTuneSweep: Kopf watches them; the operator writes status through
# /status only and deletes a FineTuneJob when ttlSecondsAfterFinished has passed.
- apiGroups: ["tauon.dev"]
  resources: ["finetunejobs", "inferenceservices", "finetunesweeps"]
  verbs: ["list", "watch"]
# FineTuneJobs: a sweep's trials (<sweep>-t<k>) are created by the operator, and deleted when the sweep
# fails; get after a 409 on create checks the existing trial is the sweep's.
- apiGroups: ["tauon.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "create", "delete"]
- apiGroups: ["tauon.dev"]
  resources: ["finetunejobs/status", "inferenceservices/status", "finetunesweeps/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: true. Clusters that enable the
# OwnerReferencesPermissionEnforcement admission plugin (OpenShift does) require update on the owner's
# finalizers subresource for that; the operator never adds finalizers to user objects.
- apiGroups: ["tauon.dev"]
  resources: ["finetunejobs/finalizers", "inferenceservices/finalizers", "finetunesweeps/finalizers"]
  verbs: ["update"]
# Trainer pods: created per gang attempt, deleted on restarts, stopped (patch activeDeadlineSeconds) on
# terminal failures; get after a 409 on create checks the existing pod is ours.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# <job>-config ConfigMaps (created once, garbage-collected through ownerReferences).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create"]
# <job>-nodes headless Services (create) and InferenceService Services (server-side apply: patch, and
# create when the apply creates the object).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Access modes of pvc:// claims for multi-node jobs (must be shareable).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Kubernetes Events (core/v1) posted by the operator's own API client, once per transition.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# InferenceService predictor/canary Deployments (server-side apply; the canary is deleted when removed).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# InferenceService HPAs (autoscaling/v2; server-side apply; deleted when autoscaling is removed).
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- if eq .Values.operator.gangScheduler "volcano" }}
# Gang scheduling with Volcano: one PodGroup per attempt (garbage-collected through ownerReferences).
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["get", "create"]
{{- else if eq .Values.operator.gangScheduler "scheduler-plugins" }}
# Gang scheduling with scheduler-plugins (coscheduling): one PodGroup per attempt.
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["get", "create"]
{{- end }}
{{- end }}

{{/* Cluster-scoped, read-only: what Kopf observes to notice CRDs (and namespaces) appearing. */}}
{{- define "tauon.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if include "tauon.watchNamespaces" . | fromJsonArray }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
