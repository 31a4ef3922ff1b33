// Hub virtual network: the Application Gateway subnet and the private-endpoint subnet, each with
// its NSG. Function App integration subnets live in per-region spoke networks (spoke.bicep),
// because regional VNet integration needs a VNet in the app's own region and a subnet per plan.

@description('Region of the hub network (the Application Gateway region).')
param location string

@description('Short lowercase prefix used in resource names.')
param namePrefix string

param tags object = {}

@description('Address space of the hub network.')
param addressPrefix string

@description('Subnet for Application Gateway v2 (dedicated; /24 recommended so it can scale out).')
param appGatewaySubnetPrefix string

@description('Subnet for private endpoints.')
param privateEndpointSubnetPrefix string

@description('Open port 80 to the gateway (only for the HTTP to HTTPS redirect listener).')
param allowHttpInbound bool

// Application Gateway v2 needs GatewayManager on 65200-65535 and the Azure load balancer probes;
// clients reach the listener on 443 (and 80 only when the redirect is on). Everything else is denied.
var appGatewayBaseRules = [
  {
    name: 'AllowGatewayManagerInbound'
    properties: {
      priority: 100
      direction: 'Inbound'
      access: 'Allow'
      protocol: 'Tcp'
      sourceAddressPrefix: 'GatewayManager'
      sourcePortRange: '*'
      destinationAddressPrefix: '*'
      destinationPortRange: '65200-65535'
    }
  }
  {
    name: 'AllowAzureLoadBalancerInbound'
    properties: {
      priority: 110
      direction: 'Inbound'
      access: 'Allow'
      protocol: '*'
      sourceAddressPrefix: 'AzureLoadBalancer'
      sourcePortRange: '*'
      destinationAddressPrefix: '*'
      destinationPortRange: '*'
    }
  }
  {
    name: 'AllowHttpsInbound'
    properties: {
      priority: 120
      direction: 'Inbound'
      access: 'Allow'
      protocol: 'Tcp'
      sourceAddressPrefix: 'Internet'
      sourcePortRange: '*'
      destinationAddressPrefix: '*'
      destinationPortRange: '443'
    }
  }
  {
    name: 'DenyAllOtherInbound'
    properties: {
      priority: 4096
      direction: 'Inbound'
      access: 'Deny'
      protocol: '*'
      sourceAddressPrefix: '*'
      sourcePortRange: '*'
      destinationAddressPrefix: '*'
      destinationPortRange: '*'
    }
  }
]

var appGatewayHttpRule = [
  {
    name: 'AllowHttpRedirectInbound'
    properties: {
      priority: 130
      direction: 'Inbound'
      access: 'Allow'
      protocol: 'Tcp'
      sourceAddressPrefix: 'Internet'
      sourcePortRange: '*'
      destinationAddressPrefix: '*'
      destinationPortRange: '80'
    }
  }
]

resource appGatewayNsg 'Microsoft.Network/networkSecurityGroups@2024-05-01' = {
  //checkov:skip=CKV_AZURE_160:Port 80 opens only when enableHttpRedirect is true, and then serves nothing but a 301 to HTTPS.
  name: 'nsg-${namePrefix}-appgw'
  location: location
  tags: tags
  properties: {
    securityRules: concat(appGatewayBaseRules, allowHttpInbound ? appGatewayHttpRule : [])
  }
}

resource privateEndpointNsg 'Microsoft.Network/networkSecurityGroups@2024-05-01' = {
  name: 'nsg-${namePrefix}-pe'
  location: location
  tags: tags
  properties: {
    securityRules: [
      {
        name: 'AllowVnetHttpsInbound'
        properties: {
          priority: 100
          direction: 'Inbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: 'VirtualNetwork'
          sourcePortRange: '*'
          destinationAddressPrefix: 'VirtualNetwork'
          destinationPortRange: '443'
        }
      }
      {
        name: 'DenyAllOtherInbound'
        properties: {
          priority: 4096
          direction: 'Inbound'
          access: 'Deny'
          protocol: '*'
          sourceAddressPrefix: '*'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: '*'
        }
      }
    ]
  }
}

// The gateway subnet's Microsoft.Web service endpoint lists every location: without it the
// endpoint covers only this region, and a Function App in another region (appLocation in
// aoaiResources) would see the gateway's traffic arrive from its public address, answer 403 and
// leave the backend unhealthy.
resource vnet 'Microsoft.Network/virtualNetworks@2024-05-01' = {
  name: 'vnet-${namePrefix}-hub'
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: 'snet-appgw'
        properties: {
          addressPrefix: appGatewaySubnetPrefix
          networkSecurityGroup: {
            id: appGatewayNsg.id
          }
          // Apps admit only this subnet, through the Microsoft.Web service endpoint; all
          // locations, or an app in another region sees the gateway's public address (403).
          serviceEndpoints: [
            {
              service: 'Microsoft.Web'
              locations: [
                '*'
              ]
            }
          ]
        }
      }
      {
        name: 'snet-pe'
        properties: {
          addressPrefix: privateEndpointSubnetPrefix
          networkSecurityGroup: {
            id: privateEndpointNsg.id
          }
          // Apply the NSG to private endpoints too.
          privateEndpointNetworkPolicies: 'Enabled'
        }
      }
    ]
  }
}

output vnetId string = vnet.id
output vnetName string = vnet.name
output appGatewaySubnetId string = '${vnet.id}/subnets/snet-appgw'
output privateEndpointSubnetId string = '${vnet.id}/subnets/snet-pe'
