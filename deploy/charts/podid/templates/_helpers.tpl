{{/*
Base name of every object. Deliberately "aad-pod-identity" rather than the chart name, so objects
keep the names and (immutable) selectors of an existing aad-pod-identity release.
*/}}
{{- define "podid.name" -}}
{{- default "aad-pod-identity" .Values.nameOverride | trunc 59 | trimSuffix "-" -}}
{{- end -}}

{{- define "podid.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 59 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "podid.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 59 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 59 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "podid.mic.fullname" -}}
{{- printf "%s-mic" (include "podid.name" .) -}}
{{- end -}}

{{- define "podid.nmi.fullname" -}}
{{- printf "%s-nmi" (include "podid.name" .) -}}
{{- end -}}

{{- define "podid.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: same keys and values as the aad-pod-identity chart. */}}
{{- define "podid.selectors" -}}
app.kubernetes.io/name: {{ include "podid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "podid.labels" -}}
{{ include "podid.selectors" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "podid.chart" . }}
{{- end -}}

{{/* Namespace of MIC's leader-election Lease. */}}
{{- define "podid.mic.leaseNamespace" -}}
{{- default "default" .Values.mic.leaderElection.namespace -}}
{{- end -}}

{{- define "podid.mic.leaseName" -}}
{{- default "aad-pod-identity-mic" .Values.mic.leaderElection.name -}}
{{- end -}}
