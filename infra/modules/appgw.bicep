// Application Gateway v2 (WAF_v2) in front of every Function App: TLS on 443 with a Key Vault
// certificate, an optional HTTP→HTTPS redirect, one backend pool holding every app host name,
// HTTPS backend settings with the host name taken from the backend, a health probe on the
// handler's anonymous health route, response buffering off (so SSE streams flow), and the
// rewrite rule set from rewrite-rules.json bound to the routing rule.

param location string
param namePrefix string
param tags object = {}
param subnetId string

@description('Function App host names (e.g. app.azurewebsites.net).')
param backendHostNames array

@description('Versionless Key Vault secret ID of the TLS certificate (PFX).')
param tlsCertificateSecretId string

@description('User-assigned identity that can read the certificate.')
param identityId string

@description('rewriteRules array in Application Gateway\'s schema.')
param rewriteRules array

@description('Health probe: path, intervalSeconds, timeoutSeconds, unhealthyThreshold, statusCodes.')
param probe object

@minValue(1)
@maxValue(230)
@description('Backend request timeout in seconds; the Azure Functions front end cuts HTTP calls at 230 s.')
param requestTimeoutSeconds int

param enableHttpRedirect bool

@allowed([
  'Prevention'
  'Detection'
])
param wafMode string

@description('Largest request body the WAF inspects and accepts (KB). AOAI bodies with inline images or audio can be large.')
param wafMaxRequestBodySizeInKb int

@description('Largest multipart upload (MB), e.g. audio transcription.')
param wafFileUploadLimitInMb int

param minCapacity int
param maxCapacity int

@description('Availability zones for the gateway and its public IP; empty for regions without zones.')
param zones array

@description('Log Analytics workspace for access and firewall logs.')
param logAnalyticsWorkspaceId string

var name = 'agw-${namePrefix}'
var gwId = resourceId('Microsoft.Network/applicationGateways', name)

resource publicIp 'Microsoft.Network/publicIPAddresses@2024-05-01' = {
  name: 'pip-${name}'
  location: location
  tags: tags
  zones: zones
  sku: {
    name: 'Standard'
    tier: 'Regional'
  }
  properties: {
    publicIPAllocationMethod: 'Static'
    publicIPAddressVersion: 'IPv4'
    dnsSettings: {
      domainNameLabel: toLower('${namePrefix}-${uniqueString(resourceGroup().id)}')
    }
  }
}

resource wafPolicy 'Microsoft.Network/ApplicationGatewayWebApplicationFirewallPolicies@2024-05-01' = {
  name: 'waf-${namePrefix}'
  location: location
  tags: tags
  properties: {
    policySettings: {
      state: 'Enabled'
      mode: wafMode
      requestBodyCheck: true
      maxRequestBodySizeInKb: wafMaxRequestBodySizeInKb
      fileUploadLimitInMb: wafFileUploadLimitInMb
    }
    managedRules: {
      managedRuleSets: [
        {
          // OWASP CRS 3.2 (includes the Log4Shell rule 944240). To move to the Default Rule
          // Set, change it here: ruleSetType 'Microsoft_DefaultRuleSet', ruleSetVersion '2.1'.
          ruleSetType: 'OWASP'
          ruleSetVersion: '3.2'
        }
      ]
    }
  }
}

var httpsListener = {
  name: 'listener-https'
  properties: {
    frontendIPConfiguration: {
      id: '${gwId}/frontendIPConfigurations/frontend-public'
    }
    frontendPort: {
      id: '${gwId}/frontendPorts/port-443'
    }
    protocol: 'Https'
    sslCertificate: {
      id: '${gwId}/sslCertificates/tls-cert'
    }
  }
}

var httpListener = {
  name: 'listener-http'
  properties: {
    frontendIPConfiguration: {
      id: '${gwId}/frontendIPConfigurations/frontend-public'
    }
    frontendPort: {
      id: '${gwId}/frontendPorts/port-80'
    }
    protocol: 'Http'
  }
}

var forwardRule = {
  name: 'rule-forward'
  properties: {
    ruleType: 'Basic'
    priority: 100
    httpListener: {
      id: '${gwId}/httpListeners/listener-https'
    }
    backendAddressPool: {
      id: '${gwId}/backendAddressPools/pool-functions'
    }
    backendHttpSettings: {
      id: '${gwId}/backendHttpSettingsCollection/settings-functions'
    }
    rewriteRuleSet: {
      id: '${gwId}/rewriteRuleSets/aoai-to-function'
    }
  }
}

var redirectRule = {
  name: 'rule-http-to-https'
  properties: {
    ruleType: 'Basic'
    priority: 200
    httpListener: {
      id: '${gwId}/httpListeners/listener-http'
    }
    redirectConfiguration: {
      id: '${gwId}/redirectConfigurations/redirect-to-https'
    }
  }
}

resource gateway 'Microsoft.Network/applicationGateways@2024-05-01' = {
  name: name
  location: location
  tags: tags
  zones: zones
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    sku: {
      name: 'WAF_v2'
      tier: 'WAF_v2'
    }
    autoscaleConfiguration: {
      minCapacity: minCapacity
      maxCapacity: maxCapacity
    }
    enableHttp2: true
    firewallPolicy: {
      id: wafPolicy.id
    }
    sslPolicy: {
      policyType: 'Predefined'
      policyName: 'AppGwSslPolicy20220101S'
    }
    globalConfiguration: {
      // WAF_v2 always buffers requests; response buffering must be off or SSE streams stall
      // until the whole completion is done.
      enableRequestBuffering: true
      enableResponseBuffering: false
    }
    gatewayIPConfigurations: [
      {
        name: 'gateway-ip'
        properties: {
          subnet: {
            id: subnetId
          }
        }
      }
    ]
    sslCertificates: [
      {
        name: 'tls-cert'
        properties: {
          keyVaultSecretId: tlsCertificateSecretId
        }
      }
    ]
    frontendIPConfigurations: [
      {
        name: 'frontend-public'
        properties: {
          publicIPAddress: {
            id: publicIp.id
          }
        }
      }
    ]
    frontendPorts: concat([
      {
        name: 'port-443'
        properties: {
          port: 443
        }
      }
    ], enableHttpRedirect ? [
      {
        name: 'port-80'
        properties: {
          port: 80
        }
      }
    ] : [])
    backendAddressPools: [
      {
        name: 'pool-functions'
        properties: {
          backendAddresses: [for h in backendHostNames: {
            fqdn: h
          }]
        }
      }
    ]
    probes: [
      {
        name: 'probe-health'
        properties: {
          protocol: 'Https'
          path: probe.path
          interval: probe.intervalSeconds
          timeout: probe.timeoutSeconds
          unhealthyThreshold: probe.unhealthyThreshold
          pickHostNameFromBackendHttpSettings: true
          match: {
            statusCodes: probe.statusCodes
          }
        }
      }
    ]
    backendHttpSettingsCollection: [
      {
        name: 'settings-functions'
        properties: {
          port: 443
          protocol: 'Https'
          cookieBasedAffinity: 'Disabled'
          // App Service routes by Host: send the app's own *.azurewebsites.net name.
          pickHostNameFromBackendAddress: true
          requestTimeout: requestTimeoutSeconds
          probe: {
            id: '${gwId}/probes/probe-health'
          }
        }
      }
    ]
    httpListeners: concat([
      httpsListener
    ], enableHttpRedirect ? [
      httpListener
    ] : [])
    redirectConfigurations: enableHttpRedirect ? [
      {
        name: 'redirect-to-https'
        properties: {
          redirectType: 'Permanent'
          targetListener: {
            id: '${gwId}/httpListeners/listener-https'
          }
          includePath: true
          includeQueryString: true
        }
      }
    ] : []
    rewriteRuleSets: [
      {
        name: 'aoai-to-function'
        properties: {
          rewriteRules: rewriteRules
        }
      }
    ]
    requestRoutingRules: concat([
      forwardRule
    ], enableHttpRedirect ? [
      redirectRule
    ] : [])
  }
}

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: gateway
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output id string = gateway.id
output publicIpAddress string = publicIp.properties.ipAddress
output fqdn string = publicIp.properties.dnsSettings.fqdn
