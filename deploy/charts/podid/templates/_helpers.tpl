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

{{/* "true" while MIC also keeps upstream's Endpoints leader lock (mic.upstreamLeaderLock, on
unless false or "false"), empty otherwise. */}}
{{- define "podid.mic.upstreamLeaderLock" -}}
{{- if ne (toString .Values.mic.upstreamLeaderLock) "false" }}true{{ end -}}
{{- end -}}

{{/*
Refuse values that would deploy aad-pod-identity's Go images under podid's RBAC and probes (an
upstream values file that kept `image.repository` or the image tags): the pods would never turn
Ready and MIC would never lead, with nothing failing at render time. Upstream released its images
as <registry>/…/aad-pod-identity/{mic,nmi} with tags v1.5 to v1.8.
*/}}
{{- define "podid.validateImages" -}}
{{- $keys := list -}}
{{- if hasSuffix "aad-pod-identity" (trimSuffix "/" (toString .Values.image.repository)) -}}
{{- $keys = append $keys (printf "image.repository (%s)" .Values.image.repository) -}}
{{- end -}}
{{- range $component := list "mic" "nmi" -}}
{{- $tag := toString (index $.Values $component "tag") -}}
{{- if regexMatch "^v?1\\.[5-8]\\.[0-9]+$" $tag -}}
{{- $keys = append $keys (printf "%s.tag (%s)" $component $tag) -}}
{{- end -}}
{{- end -}}
{{- if $keys -}}
{{- fail (printf "these values select aad-pod-identity's Go images, which do not run under this chart: %s. Drop these keys from your values file (the chart's defaults are the podid images) or set them to podid images; see the chart README, \"Upgrading from aad-pod-identity\"." (join ", " $keys)) -}}
{{- end -}}
{{- end -}}
