{{/* Names and labels shared by every template. */}}

{{- define "kubetrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or just <release> when it already contains the chart name. */}}
{{- define "kubetrain.fullname" -}}
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

{{- define "kubetrain.operatorName" -}}
{{- printf "%s-operator" (include "kubetrain.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object, but app.kubernetes.io/instance (see kubetrain.labels). */}}
{{- define "kubetrain.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: kubetrain
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubetrain.labels" -}}
{{ include "kubetrain.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's selector labels (stable across upgrades: a Deployment's selector is immutable). */}}
{{- define "kubetrain.operatorSelector" -}}
app.kubernetes.io/name: {{ include "kubetrain.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kubetrain.operatorLabels" -}}
{{ include "kubetrain.commonLabels" . }}
{{ include "kubetrain.operatorSelector" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetrain.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository:tag@digest when a digest is given. */}}
{{- define "kubetrain.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Namespaces whose trainer pods the PodMonitor selects (empty list: any namespace). */}}
{{- define "kubetrain.podMonitorNamespaces" -}}
{{- $ns := .Values.metrics.podMonitor.namespaces | default .Values.watchNamespaces }}
{{- toJson ($ns | default list) }}
{{- end }}
