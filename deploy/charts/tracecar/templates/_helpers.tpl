{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "tracecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "tracecar.fullname" -}}
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

{{/* Name of the injector's objects (Deployment, Service, ...). */}}
{{- define "tracecar.injector.fullname" -}}
{{- printf "%s-injector" (include "tracecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tracecar.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: tracecar
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tracecar.labels" -}}
{{ include "tracecar.commonLabels" . }}
app.kubernetes.io/name: {{ include "tracecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of the injector pods. `app.kubernetes.io/name: tracecar-injector` is fixed: the
webhook's objectSelector excludes pods with it and the injector itself refuses to inject them.
*/}}
{{- define "tracecar.injector.selectorLabels" -}}
app.kubernetes.io/name: tracecar-injector
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tracecar.injector.labels" -}}
{{ include "tracecar.commonLabels" . }}
{{ include "tracecar.injector.selectorLabels" . }}
app.kubernetes.io/component: injector
{{- end }}

{{- define "tracecar.serviceAccountName" -}}
{{- if .Values.injector.serviceAccount.create }}
{{- default (include "tracecar.injector.fullname" .) .Values.injector.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.injector.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: repo:tag, or repo:tag@digest when a digest is
set. The tag defaults to the chart's appVersion. Call with (dict "image" .Values.images.x "root" .).
*/}}
{{- define "tracecar.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag | toString }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* Secret holding the webhook's serving certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "tracecar.webhook.tlsSecretName" -}}
{{- printf "%s-webhook-tls" (include "tracecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the MutatingWebhookConfiguration (cluster-scoped: includes the namespace). */}}
{{- define "tracecar.webhook.configName" -}}
{{- printf "%s-%s" (include "tracecar.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* DNS names the API server uses to reach the injector Service. */}}
{{- define "tracecar.webhook.dnsNames" -}}
{{- $svc := include "tracecar.injector.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson }}
{{- end }}
